"""The module layout: imports run one way, settings -> core -> storages -> the HTTP front -> IIIF and its engine
-> the app -> admin commands."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ['settings', 'core', 's3storage', 'front', 'iiif', 'pyramids', 'server', 'migrate', 'derivatives']    # each may import only those before it


def project_imports(module):
    """The project modules `module` imports anywhere in its source, lazy imports inside functions included."""
    with open(os.path.join(ROOT, module + '.py'), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split('.')[0])
    return found & set(LAYERS)


def test_every_python_module_at_the_top_level_has_a_place_in_the_layers():
    modules = {name[:-3] for name in os.listdir(ROOT) if name.endswith('.py')}
    assert modules == set(LAYERS)


@pytest.mark.parametrize('module', LAYERS)
def test_a_module_imports_only_the_layers_below_it(module):
    below = set(LAYERS[:LAYERS.index(module)])
    assert project_imports(module) <= below, f'{module} imports {project_imports(module) - below}'


def test_running_server_py_loads_the_application_once():
    """`python server.py` must not import itself again as `server` (two copies of every global)."""
    check = subprocess.run(
        [sys.executable, '-c',
         "import sys, runpy\n"
         "import core\n"
         "core.load_config = lambda: (_ for _ in ()).throw(core.ConfigError('stop here'))\n"
         "try:\n"
         "    runpy.run_path('server.py', run_name='__main__')\n"
         "except SystemExit:\n"
         "    pass\n"
         "print('server' in sys.modules)\n"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == 'False', check.stderr
