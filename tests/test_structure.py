"""The layer package's shape, drawn from its imports: a star of at most 4 floors, no circles."""
import ast
import functools
import os.path as osp
import pkgutil

import mmcbn.layers

LAYERS = osp.dirname(mmcbn.layers.__file__)


def _imports():
    modules = [m.name for m in pkgutil.iter_modules([LAYERS])]
    deps = {}
    for name in modules:
        with open(osp.join(LAYERS, f'{name}.py')) as f:
            tree = ast.parse(f.read())
        deps[name] = {node.module for node in ast.walk(tree)
                      if isinstance(node, ast.ImportFrom) and node.level == 1 and
                      node.module in modules}
    return deps


def test_the_layer_package_is_at_most_four_floors_without_circles():
    deps = _imports()

    @functools.lru_cache(None)
    def floor(name, seen=()):
        assert name not in seen, f'import circle: {" -> ".join(seen + (name, ))}'
        return 1 + max((floor(d, seen + (name, )) for d in deps[name]), default=0)

    floors = {name: floor(name) for name in deps}
    assert max(floors.values()) <= 4, floors
    assert floors['cross_iteration_bn'] == max(floors.values())  # the layer sits on top
