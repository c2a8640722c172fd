"""docker-compose.yml checked without a Docker engine: against the Compose specification's own JSON
schema (pinned: the copy check-jsonschema ships), for pinned images, and for the settings, paths and
port it shares with the server and the Dockerfile. Each check runs on the file as shipped and with
every commented-out `# name: value` option switched on, as the README tells people to do."""

import importlib.resources
import json
import os
import re
import shlex
import subprocess

import jsonschema
import pytest
import yaml

import settings
from harness.processes import PROJECT
from harness.seaweed import WEED
from config import ConfigError, ENV_ALIASES, VERSION, load_config, parse_setting

OPTION = re.compile(r'^([ \t]*)# ([ \t]*[A-Za-z_][\w.-]*:(?:[ \t]|$))', re.M)   # `# name: value`
VARIANTS = ['as shipped', 'options on']


def project_file(name):
    with open(os.path.join(PROJECT, name)) as f:
        return f.read()


def compose_file(variant):
    """The parsed compose file, as shipped or with every commented-out option uncommented."""
    text = project_file('docker-compose.yml')
    return yaml.safe_load(OPTION.sub(r'\1\2', text) if variant == 'options on' else text)


@pytest.fixture(scope='module')
def compose_schema():
    """A validator for compose-spec.json, of the JSON Schema draft the schema itself declares."""
    vendored = importlib.resources.files('check_jsonschema.builtin_schemas.vendor')
    schema = json.loads(vendored.joinpath('compose-spec.json').read_text())
    validator = jsonschema.validators.validator_for(schema, default=None)
    assert validator is not None, f'jsonschema does not know the draft {schema.get("$schema")!r}'
    validator.check_schema(schema)
    return validator(schema)


def schema_errors(validator, document):
    """Every way the document breaks the schema, each as `path: message`."""
    return sorted(f'{"/".join(map(str, e.absolute_path)) or "(top)"}: {e.message}'
                  for e in validator.iter_errors(document))


def environment(service):
    """The variables a service's container gets, as text, when the shell sets none of its own."""
    given = service.get('environment') or {}
    if isinstance(given, list):
        given = dict(item.split('=', 1) if '=' in item else (item, None) for item in given)
    found = {}
    for name, value in given.items():
        if value is None:                  # `NAME:` passes the shell's variable through: unset here
            continue
        if isinstance(value, bool):
            value = 'true' if value else 'false'
        found[name] = re.sub(r'\$\$|\$\{\w+(?::?-([^}]*))?\}',
                             lambda m: '$' if m.group() == '$$' else m.group(1) or '', str(value))
    return found


def dockerfile():
    """The Dockerfile's ENV values, VOLUME paths and EXPOSE ports."""
    text = re.sub(r'\\\n', ' ', project_file('Dockerfile'))
    env, volumes, exposed = {}, [], []
    for line in text.split('\n'):
        instruction, _, rest = line.strip().partition(' ')
        if instruction == 'ENV':
            words = shlex.split(rest)
            pairs = [w.split('=', 1) for w in words] if '=' in words[0] else [(words[0], ' '.join(words[1:]))]
            env.update(pairs)
        elif instruction == 'VOLUME':
            volumes += json.loads(rest) if rest.lstrip().startswith('[') else rest.split()
        elif instruction == 'EXPOSE':
            exposed += [int(port.split('/')[0]) for port in rest.split()]
    return env, volumes, exposed


def image_tag(image):
    """The tag of an image reference (`registry:port/name:tag@digest`), or None when it has none."""
    name = image.split('@')[0]
    _, colon, tag = name.rpartition(':')
    return tag if colon and '/' not in tag else None


def mounts(service):
    """(source, target) of each of a service's volumes, short or long syntax."""
    for volume in service.get('volumes', []):
        if isinstance(volume, dict):
            yield volume.get('source'), volume['target']
        else:
            source, target = volume.split(':')[:2]
            yield source, target


def container_ports(service):
    """The container side of each published port, short or long syntax."""
    for port in service.get('ports', []):
        if isinstance(port, dict):
            yield int(port['target'])
        else:
            yield int(str(port).split('/')[0].rsplit(':', 1)[-1])


# --- The Compose specification ---------------------------------------------------------------

@pytest.mark.parametrize('variant', VARIANTS)
def test_the_compose_file_is_valid_compose(compose_schema, variant):
    assert schema_errors(compose_schema, compose_file(variant)) == []


@pytest.mark.parametrize('fault, message', [
    ({'restart_policy': 'always'}, "'restart_policy' was unexpected"),
    ({'ports': 8080}, "8080 is not of type 'array'"),
], ids=['unknown key', 'wrong type'])
def test_the_schema_check_refuses_a_broken_service(compose_schema, fault, message):
    broken = compose_file('as shipped')
    broken['services']['asset-server'].update(fault)
    assert any(message in error for error in schema_errors(compose_schema, broken))


@pytest.mark.parametrize('variant', VARIANTS)
def test_every_named_volume_and_network_a_service_uses_is_declared(variant):
    compose = compose_file(variant)
    undeclared = []
    for name, service in compose['services'].items():
        for source, _ in mounts(service):
            if source and not source.startswith(('/', '.', '~')) and source not in (compose.get('volumes') or {}):
                undeclared.append(f'{name}: volume {source}')
        for network in service.get('networks', []):
            if network != 'default' and network not in (compose.get('networks') or {}):
                undeclared.append(f'{name}: network {network}')
    assert undeclared == []


def test_the_commented_out_options_are_object_storage_https_and_specify7s_network():
    shipped, options = compose_file('as shipped'), compose_file('options on')
    added = set(environment(options['services']['asset-server'])) - set(environment(shipped['services']['asset-server']))
    assert {'STORAGE', 'S3_ENDPOINT_URL', 'S3_BUCKET', 'PUBLIC_SCHEME'} <= added
    assert 'specify7' in options['services']['asset-server']['networks'] and 'specify7' in options['networks']


# --- Images ----------------------------------------------------------------------------------

def test_every_image_names_an_explicit_version_not_latest():
    images = {name: service.get('image') for name, service in compose_file('as shipped')['services'].items()}
    unpinned = {name: image for name, image in images.items() if image_tag(image or '') in (None, 'latest')}
    assert unpinned == {}


def test_the_seaweedfs_image_is_the_build_the_tests_run():
    version = subprocess.run([WEED, 'version'], capture_output=True, text=True, timeout=30).stdout
    size, number = re.search(r'version (\d+GB) (\d+\.\d+)', version).groups()
    build = number + ('_large_disk' if size == '8000GB' else '')
    assert image_tag(compose_file('as shipped')['services']['seaweedfs']['image']) == build


# --- The settings the server reads -----------------------------------------------------------

@pytest.mark.parametrize('variant', VARIANTS)
def test_every_environment_name_is_a_setting_the_server_reads(variant):
    readable = {name for name in dir(settings) if name.isupper()} | set(ENV_ALIASES)
    names = environment(compose_file(variant)['services']['asset-server'])
    assert sorted(set(names) - readable) == []


@pytest.mark.parametrize('variant', VARIANTS)
def test_every_environment_value_parses_as_its_setting(variant):
    unreadable = []
    for name, text in environment(compose_file(variant)['services']['asset-server']).items():
        setting = ENV_ALIASES.get(name, name)
        try:
            parse_setting(setting, text, getattr(settings, setting))
        except ConfigError as error:
            unreadable.append(str(error))
    assert unreadable == []


@pytest.mark.parametrize('variant', VARIANTS)
def test_the_server_starts_with_the_environment_compose_sets(variant, tmp_path):
    given = environment(compose_file(variant)['services']['asset-server'])
    config = load_config(environ=dict(given, BASE_DIR=str(tmp_path)))
    settings_given = {ENV_ALIASES.get(name, name): text for name, text in given.items()}
    assert {name: getattr(config, name) for name in settings_given} == \
        {name: parse_setting(name, text, getattr(settings, name)) for name, text in settings_given.items()}


# --- What the compose file shares with the Dockerfile ----------------------------------------

def test_the_attachments_volume_is_mounted_where_the_image_keeps_attachments():
    service = compose_file('as shipped')['services']['asset-server']
    env, volumes, _ = dockerfile()
    base_dir = environment(service).get('BASE_DIR', env['BASE_DIR'])
    named_targets = {target for source, target in mounts(service) if source and not source.startswith(('/', '.'))}
    assert (base_dir in volumes, base_dir in named_targets) == (True, True)


def test_the_published_port_is_the_one_the_image_listens_on():
    service = compose_file('as shipped')['services']['asset-server']
    env, _, exposed = dockerfile()
    port = int(environment(service).get('PORT', env['PORT']))
    assert (set(container_ports(service)), port in exposed) == ({port}, True)


def test_the_servers_image_tag_is_the_release_the_capabilities_document_names():
    assert compose_file('as shipped')['services']['asset-server']['image'] == \
        f'specify-web-asset-server:{VERSION}'
