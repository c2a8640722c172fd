"""The module layout: imports run one way, settings -> shared pieces -> storages and engines -> the derivative
cache -> the app's own pieces -> the app -> admin commands."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ['storages', 'engines']
LAYERS = [                              # each may import only those before it
    'settings',
    'names', 'files', 'checksums', 'audit', 'kinds', 'errors', 'config', 'tokens', 'iiif', 'progress',   # shared pieces
    'storages.base', 'storages.disk', 'storages.s3', 'storages',                   # storages
    'engines.framing', 'engines.scheduling', 'engines.imagemagick', 'engines.children', 'engines.pyramids', 'engines.vips',
    'engines.exif_child', 'engines.metadata', 'engines',                            # engines
    'cache', 'trash',                                                               # the derivative cache, the trash
    'waiting_room', 'front', 'answers', 'uploads',                                  # the app's own pieces
    'server',                                                                       # the app
    'migrate', 'derivatives', 'preservation',                                       # admin commands
]


def source_path(module):
    parts = module.split('.')
    if parts[0] in PACKAGES and len(parts) == 1:
        return os.path.join(ROOT, module, '__init__.py')
    return os.path.join(ROOT, *parts) + '.py'


def project_imports(module):
    """The project modules `module` imports anywhere in its source, lazy imports inside functions included."""
    with open(source_path(module), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found & set(LAYERS)


def project_modules():
    """Every Python module of the project: at the top level and in its packages."""
    found = {name[:-3] for name in os.listdir(ROOT) if name.endswith('.py')}
    for package in PACKAGES:
        found |= {package if name == '__init__.py' else f'{package}.{name[:-3]}'
                  for name in os.listdir(os.path.join(ROOT, package)) if name.endswith('.py')}
    return found


def test_every_python_module_has_a_place_in_the_layers():
    assert project_modules() == set(LAYERS)


@pytest.mark.parametrize('module', LAYERS)
def test_a_module_imports_only_the_layers_below_it(module):
    below = set(LAYERS[:LAYERS.index(module)])
    assert project_imports(module) <= below, f'{module} imports {project_imports(module) - below}'


@pytest.mark.parametrize('module', LAYERS)
def test_no_module_is_longer_than_900_lines(module):
    with open(source_path(module), encoding='utf-8') as f:
        assert len(f.readlines()) <= 900


def test_nothing_below_the_app_imports_bottle():
    below = LAYERS[:LAYERS.index('answers')]
    with_bottle = [module for module in below if 'bottle' in imported_packages(module)]
    assert with_bottle == []


def imported_packages(module):
    with open(source_path(module), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    return {alias.name.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names} \
        | {node.module.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_running_server_py_loads_the_application_once():
    """`python server.py` must not import itself again as `server` (two copies of every global)."""
    check = subprocess.run(
        [sys.executable, '-c',
         "import sys, runpy\n"
         "import config\n"
         "config.load_config = lambda: (_ for _ in ()).throw(config.ConfigError('stop here'))\n"
         "try:\n"
         "    runpy.run_path('server.py', run_name='__main__')\n"
         "except SystemExit:\n"
         "    pass\n"
         "print('server' in sys.modules)\n"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == 'False', check.stderr
