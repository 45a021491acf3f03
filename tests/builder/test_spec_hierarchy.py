"""builder.spec: hierarchical ``categories``, flattened into leaf classes keyed by label path."""

from __future__ import annotations

import pickle

import pytest
import yaml
from pydantic import ValidationError

import builder.spec as spec_mod
from builder.errors import SpecError
from builder.job import UnitPlanner
from builder.spec import OutputSpec, flatten_categories, loads_spec, parse_spec

SOURCES = [{"engine": "sandbox", "url": "http://127.0.0.1:1"}]


def spec_of(categories, **extra):
    return parse_spec({"name": "tree", "sources": SOURCES, "categories": categories, **extra})


def problems_of(categories, **extra) -> dict[str, str]:
    with pytest.raises(SpecError) as e:
        spec_of(categories, **extra)
    return dict(e.value.problems)


DEEP = {
    "animals": {
        "mammals": {"dog": ["dog photo", "puppy"], "red_fox": None},
        "birds": {"eagle": "eagle in flight"},
    },
    "plants": {"rose": {"target": 7}},
}


def test_depth_three_gives_leaf_label_paths_in_yaml_order():
    spec = spec_of(DEEP)
    assert spec.labels == ["animals/mammals/dog", "animals/mammals/red_fox",
                           "animals/birds/eagle", "plants/rose"]
    assert spec.depth == 3
    assert spec.levels_of("animals/mammals/dog") == ["animals", "mammals", "dog"]
    assert spec.levels_of("plants/rose") == ["plants", "rose"]
    # Only leaves are classes: no parent label is a class.
    assert "animals" not in spec.classes and "animals/mammals" not in spec.classes


def test_queries_default_to_the_leaf_name_and_keep_given_ones():
    spec = spec_of(DEEP)
    assert spec.queries_of("animals/mammals/dog") == ["dog photo", "puppy"]
    assert spec.queries_of("animals/mammals/red_fox") == ["red fox"]
    assert spec.queries_of("animals/birds/eagle") == ["eagle in flight"]
    assert spec.queries_of("plants/rose") == ["rose"]
    # The same rule for a flat label with '/': its own name, not the parents' words.
    flat = parse_spec({"name": "f", "sources": SOURCES, "classes": {"mammals/grey_wolf": None}})
    assert flat.queries_of("mammals/grey_wolf") == ["grey wolf"]


def test_leaves_without_any_target_get_the_spec_default():
    spec = spec_of(DEEP, target=12)
    assert spec.target_of("animals/mammals/dog") == 12
    assert spec.target_of("animals/birds/eagle") == 12
    assert spec.target_of("plants/rose") == 7


def test_parent_target_is_split_evenly_with_the_remainder_to_the_first_children():
    spec = spec_of({"pets": {"target": 11, "cat": None, "dog": None, "hamster": None}})
    assert [spec.target_of(f"pets/{n}") for n in ("cat", "dog", "hamster")] == [4, 4, 3]
    assert sum(spec.target_of(label) for label in spec.labels) == 11


def test_children_with_their_own_target_keep_it_and_the_rest_is_shared():
    spec = spec_of({
        "animals": {
            "target": 100,
            "mammals": {"dog": {"target": 10}, "cat": None, "fox": None},
            "birds": {"target": 30, "eagle": None, "owl": None},
            "fish": None,
        },
        "plants": {"rose": None},
    }, target=5)
    # animals: 100 - birds' own 30 = 70 over mammals and fish: 35 each. mammals: 35 - dog's
    # own 10 = 25 over cat and fox: 13 and 12. birds: 30 over eagle and owl: 15 each.
    targets = {label: spec.target_of(label) for label in spec.labels}
    assert targets == {
        "animals/mammals/dog": 10, "animals/mammals/cat": 13, "animals/mammals/fox": 12,
        "animals/birds/eagle": 15, "animals/birds/owl": 15, "animals/fish": 35,
        "plants/rose": 5,
    }
    animals = [t for label, t in targets.items() if label.startswith("animals/")]
    assert sum(animals) == 100


def test_targets_set_only_on_children_add_up_without_a_parent_target():
    spec = spec_of({"a": {"b": {"target": 3}, "c": {"d": {"target": 2}, "e": None}}}, target=9)
    assert [spec.target_of(label) for label in spec.labels] == [3, 2, 9]


def test_flatten_categories_reports_where_each_leaf_was_defined():
    spec = spec_of(DEEP)
    leaves, where, problems = flatten_categories(spec.categories)
    assert problems == []
    assert list(leaves) == spec.labels
    assert where["animals/birds/eagle"] == "categories.animals.birds.eagle"


def test_a_target_that_cannot_be_split_names_its_path():
    problems = problems_of({"a": {"b": {"target": 2, "c": None, "d": None, "e": None}}})
    assert list(problems) == ["categories.a.b.target"]
    assert "target 2" in problems["categories.a.b.target"]
    assert "c, d, e" in problems["categories.a.b.target"]


def test_an_inherited_share_that_cannot_be_split_names_the_node():
    problems = problems_of({"a": {"target": 3, "g": {"target": 1},
                                  "b": {"c": None, "d": None, "e": None}}})
    assert "categories.a.b" in problems and "share 2" in problems["categories.a.b"]


def test_children_targets_must_add_up_to_their_parents():
    problems = problems_of({"a": {"target": 5, "b": {"target": 2}, "c": {"target": 2}}})
    assert "sum 4" in problems["categories.a.target"]
    problems = problems_of({"a": {"target": 3, "b": {"target": 2}, "c": {"target": 2}}})
    assert "sum 4" in problems["categories.a.target"]


def test_field_errors_inside_the_tree_name_the_path():
    problems = problems_of({"mammals": {"dog": {"target": 0}}})
    assert list(problems) == ["categories.mammals.dog.target"]
    problems = problems_of({"mammals": {"dog": 5}})
    assert "query string" in problems["categories.mammals.dog"] and "5" in \
        problems["categories.mammals.dog"]


def test_structural_problems_are_reported_together_with_paths():
    problems = problems_of({"mammals": {"queries": "mammal", "urls": ["http://127.0.0.1/x"],
                                        "dog": None},
                            "big/cat": None, "..": None})
    assert set(problems) == {"categories.mammals.queries", "categories.mammals.urls",
                             "categories.big/cat", "categories..."}
    assert "only a leaf category" in problems["categories.mammals.queries"]
    assert "bad category name" in problems["categories.big/cat"]


def test_classes_and_categories_merge_flat_first():
    spec = parse_spec({"name": "m", "sources": SOURCES, "classes": {"cat": "cat photo"},
                       "categories": {"birds": {"eagle": None}}})
    assert spec.labels == ["cat", "birds/eagle"]
    assert spec.depth == 2 and spec.queries_of("cat") == ["cat photo"]


def test_a_label_defined_twice_is_an_error_naming_it():
    with pytest.raises(SpecError) as e:
        parse_spec({"name": "m", "sources": SOURCES, "classes": {"birds/eagle": None},
                    "categories": {"birds": {"eagle": None, "owl": None}}})
    problems = dict(e.value.problems)
    assert list(problems) == ["categories.birds.eagle"]
    assert "'birds/eagle'" in problems["categories.birds.eagle"]
    assert "classes.birds/eagle" in problems["categories.birds.eagle"]


def test_a_class_that_is_also_a_parent_is_an_error():
    with pytest.raises(SpecError) as e:
        parse_spec({"name": "m", "sources": SOURCES, "classes": {"birds": None},
                    "categories": {"birds": {"eagle": None}}})
    assert "only leaves are classes" in dict(e.value.problems)["classes.birds"]


def test_no_class_anywhere_is_an_error():
    with pytest.raises(SpecError, match="needs at least one class"):
        parse_spec({"name": "m", "sources": SOURCES, "categories": {}})
    with pytest.raises(SpecError, match="needs at least one class"):
        parse_spec({"name": "m", "sources": SOURCES})


def test_leaf_urls_stand_in_for_sources():
    spec = parse_spec({"name": "u", "categories": {
        "birds": {"eagle": {"urls": "http://127.0.0.1/eagle.jpg"}}}})
    assert spec.classes["birds/eagle"].urls == ["http://127.0.0.1/eagle.jpg"]
    with pytest.raises(SpecError, match="sources"):
        parse_spec({"name": "u", "categories": {"birds": {"eagle": None}}})


def test_a_list_of_names_is_a_list_of_leaves():
    assert spec_of(["cat", "dog"]).labels == ["cat", "dog"]


def test_the_documented_yaml_shape_parses_as_documented():
    doc = spec_mod.__doc__
    start = doc.index("    classes:")
    example = "\n".join(line[4:] for line in doc[start:].split("\n\n")[0].splitlines())
    spec = loads_spec("name: doc\nsources: [{engine: sandbox, url: 'http://127.0.0.1:1'}]\n"
                      + example)
    assert spec.labels == ["cat", "mammals/dog", "mammals/fox", "mammals/wolf", "birds/eagle"]
    assert [spec.target_of(label) for label in spec.labels] == [100, 25, 40, 25, 100]
    assert spec.queries_of("mammals/wolf") == ["wolf"]
    assert spec.classes["birds/eagle"].urls == ["https://example.org/eagle.jpg"]


def test_dumped_spec_parses_back_to_the_same_classes():
    spec = spec_of({"a": {"target": 9, "b": None, "c": {"d": {"target": 2}, "e": "e photo"}}},
                   classes={"flat": None})
    dumped = spec.model_dump(mode="json")
    assert list(dumped["classes"]) == ["flat"]
    assert set(dumped["categories"]["a"]) >= {"b", "c", "target"}
    again = parse_spec(yaml.safe_load(yaml.safe_dump(dumped)))
    assert again.labels == spec.labels
    assert [again.target_of(x) for x in again.labels] == [spec.target_of(x) for x in spec.labels]
    assert again.queries_of("a/c/e") == ["e photo"]
    assert pickle.loads(pickle.dumps(spec)).labels == spec.labels


def test_assignment_revalidates_without_duplicating_leaves():
    spec = spec_of({"a": {"target": 4, "b": None, "c": None}})
    spec.target = 50
    spec.description = "again"
    assert spec.labels == ["a/b", "a/c"] and spec.target_of("a/b") == 2
    spec.categories = {"x": {"y": None}}
    assert spec.labels == ["x/y"] and spec.target_of("x/y") == 50


def test_the_job_planner_searches_each_leaf_by_its_queries():
    spec = spec_of(DEEP)
    planner = UnitPlanner(spec)
    queries = {}
    for label in spec.labels:
        seen = []
        while (unit := planner.next_class_unit(label, 0.0)) is not None:
            seen.append(unit.query)
        queries[label] = seen
    assert queries["animals/mammals/red_fox"] == ["red fox"]
    assert queries["animals/mammals/dog"] == ["dog photo", "puppy"]


def test_image_label_files_need_imagefolder_and_name_the_field():
    with pytest.raises(SpecError) as e:
        spec_of(DEEP, output={"formats": ["parquet"], "image_label_files": ["txt"]})
    problems = dict(e.value.problems)
    assert "imagefolder" in problems["output.image_label_files"]
    with pytest.raises(ValidationError, match="image_label_files"):
        OutputSpec(formats=["webdataset"], image_label_files=["json"])
    with pytest.raises(SpecError) as e:
        spec_of(DEEP, output={"image_label_files": ["xml"]})
    assert "output.image_label_files.0" in dict(e.value.problems)
    out = OutputSpec(image_label_files=["yaml", "txt", "yaml"])
    assert out.image_label_files == ["yaml", "txt"] and OutputSpec().image_label_files == []


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "nul\0", "\x7f"])
def test_control_characters_in_category_names_are_rejected_naming_the_path(name):
    problems = problems_of({"mammals": {name: None, "dog": None}})
    path = f"categories.mammals.{name!r}"
    assert list(problems) == [path]
    assert "control characters" in problems[path] and repr(name) in problems[path]
    problems = problems_of({name: {"dog": None}})
    assert list(problems) == [f"categories.{name!r}"]
    assert list(problems_of([name, "cat"])) == [f"categories.{name!r}"]


@pytest.mark.parametrize("item", [{"a": 1}, 7, None, ["x"]])
def test_a_list_of_names_must_hold_strings(item):
    problems = problems_of(["cat", item])
    assert list(problems) == ["categories.1"]
    assert "name string" in problems["categories.1"] and "mapping form" in \
        problems["categories.1"]
