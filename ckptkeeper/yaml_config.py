"""YAML config files: PyYAML's safe loader, refusing a key given twice, with errors on one line. Imported
only when a YAML file is read (PyYAML takes about 10 ms to import, at every start otherwise)."""

from __future__ import annotations

from typing import Any

import yaml


class YamlProblem(Exception):
    """Why a YAML text cannot be read, as `": problem"` or `" at line L, column C: problem"`."""


def load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: yaml.safe_load but for repeated keys
    except RecursionError:
        raise YamlProblem(": nested too deeply") from None
    except ValueError as e:  # a value PyYAML cannot construct: the date 2001-13-01, an int of 5000 digits
        raise YamlProblem(f": {' '.join(str(e).split())}") from None
    except yaml.YAMLError as e:
        raise YamlProblem(_yaml_problem(e, text)) from None


def _given_twice(key: object, first: yaml.Node, again: yaml.Node) -> yaml.YAMLError:
    shown = repr(key) if len(repr(key)) <= 80 else repr(key)[:76] + "..."  # a key may be 1 MiB long
    problem = f"the key {shown} is given twice (first at line {first.start_mark.line + 1}); merge them into one"
    return yaml.constructor.ConstructorError(None, None, problem, again.start_mark)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a mapping (at any depth) that gives one key twice is an error: PyYAML
    would keep the last silently, and a second `keep:` would drop the rules of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        merges: list[yaml.Node] = []
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a sequence or mapping key is unhashable: the base class refuses it
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<` may override what it merges, once
                merges.append(key_node)
                if len(merges) > 1:
                    raise _given_twice("<<", merges[0], key_node)
                continue
            key = self.construct_object(key_node)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable: the base class says so
                continue
            if first is not None:  # compared by key, not node: an alias repeats the node of its anchor
                raise _given_twice(key, first, key_node)
            seen[key] = key_node
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """Where and what a YAML error is, as `" at line L, column C: problem"` on one line."""
    where = getattr(e, "problem_mark", None)
    at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
    problem = getattr(e, "problem", None) or str(e)
    if isinstance(e, yaml.reader.ReaderError):  # str(e) spans two lines; say where like the others
        line = text.count("\n", 0, e.position) + 1
        at = f" at line {line}, column {e.position - text.rfind(chr(10), 0, e.position)}"
        problem = str(e).splitlines()[0]
    return f"{at}: {' '.join(problem.split())}"
