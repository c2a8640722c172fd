"""Mutation testing with mutmut (slow, so not part of CI): `make mutation`.

Mutates only the functions in SCOPE, area by area (AREAS: the security rules, the token plugin for
every method, the IIIF grammar, viewer grants, the derivative policy, the front's counters and
deadlines), runs for each mutant in scope (of the lines in scope) the tests of setup.cfg's [mutmut]
section that reach the mutated function, and writes the score table (per area and in all) and every
surviving mutant's diff to bench/out/mutation.txt, the names of the killed to bench/out/killed.txt (for
--carry), mutmut's own log to bench/out/mutation.log. Run it with a Python that has mutmut and the
project's requirements installed; it starts from a fresh mutants/ folder.

    python bench/mutation.py [--max-children N] [--label TEXT] [--carry bench/out/killed.txt]
"""

import argparse
import ast
import collections
import difflib
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'bench', 'out')

# mutmut's name of each function in scope, by area; (first, last) keeps only the mutants of the lines from the
# one containing `first` to the one containing `last` (the rest of the function is out of scope).
AREAS = {
    'security rules': {                # names, tokens, static access, storage paths, offload, the migration's checks
        'names.x_name_problem': None,
        'server.x_valid_name': None,
        'server.x_valid_scale': None,
        'names.x_thumbnail_name': None,
        'names.x_is_derivative_of': None,
        'storages.base.xǁStorageǁfolder_parts': None,
        'storages.base.xǁStorageǁowns_derivative': None,
        'storages.base.xǁStorageǁis_static_parts': None,
        'kinds.x_may_run_scripts': None,
        'tokens.x_make_token': None,
        'tokens.x_token_problem': None,
        'server.x_require_token': None,
        'server.xǁTokenCheckǁapply': None,
        'server.x_static': None,
        'server.x_getfileref': None,
        'storages.disk.xǁDiskStorageǁpath': None,
        'storages.disk.xǁDiskStorageǁoriginal_path': None,
        'answers.x_answer_once': ('if config.FILE_OFFLOAD and path and not', 'return handed_over('),
        'answers.x_handed_over': None,
        'migrate.x_expected_etag': None,
        'migrate.x_is_checkable': None,
        'migrate.x_same_object': None,
        'migrate.x_folder_files': None,
        'migrate.x_bucket_objects': None,
        'migrate.x_local_matches': None,
        'migrate.x_from_s3': ('elif local_matches(target, size, etag):', "counts['already there'] += 1"),
        'migrate.x_download_one': ('verified = os.path.getsize(temp) == size', 'verified = os.path.getsize(temp) == size'),
    },
    'token plugin': {
        # The rest of the token plugin (its apply and require_token are counted with the security rules, as
        # before): tokens sent though none is needed, tokens read with, answers kept private.
        'server.x_note_read_token': None,
        'server.x_keep_private': None,
        'tokens.xǁReadTokensǁnote': None,
        'tokens.xǁReadTokensǁexpired': None,
        'tokens.xǁReadTokensǁread_with': None,
    },
    'IIIF grammar': {                  # region, size, rotation, quality and format; the limits; identifiers
        'iiif.x_parse_request': None,
        'iiif.x_plan_for': None,
        'iiif.x_check_version': None,
        'iiif.x_text_of': None,
        'iiif.x_bad': None,
        'iiif.x_pixels': None,
        'iiif.x_decimal': None,
        'iiif.x_half_up': None,
        'iiif.x_four': None,
        'iiif.x_parse_region': None,
        'iiif.x_edges': None,
        'iiif.x_parse_size': None,
        'iiif.x_pair': None,
        'iiif.x_requested': None,
        'iiif.x_explicit': None,
        'iiif.x_refuse_upscaling': None,
        'iiif.x_fit': None,
        'iiif.x_bound': None,
        'iiif.x_within_area': None,
        'iiif.x_parse_rotation': None,
        'iiif.x_parse_quality_format': None,
        'iiif.xǁLimitsǁ__post_init__': None,
        'iiif.xǁLimitsǁallow': None,
        'iiif.x_identifier_for': None,
        'iiif.x_spelling': None,
        'iiif.x_spelled_name': None,
        'iiif.x_name_for': None,
        'iiif.x_unknown': None,
    },
    'viewer grants': {                 # and which of a token and a grant an IIIF request needs
        'tokens.x_make_grant': None,
        'tokens.x_new_grant': None,
        'tokens.x_grant_problem': None,
        'server.x_viewer_grant': None,
        'server.x_iiif_original': None,
    },
    'derivative policy': {
        # Freshness against the original, the scale ladder, invalidation on replace and delete, which IIIF
        # answers are kept: the derivative service (cache.py) and disk storage (S3's needs SeaweedFS, which the
        # run has not).
        'config.x_pregenerated_scales': None,
        'cache.xǁOtherScalesǁscales_of': None,
        'cache.xǁDerivativeCacheǁensure_thumbnail': None,
        'cache.xǁDerivativeCacheǁpregenerate': None,
        'storages.disk.xǁDiskStorageǁderivative_is_fresh': None,
        'storages.disk.xǁDiskStorageǁstore_derivative': None,
        'cache.xǁDerivativeCacheǁmake_thumbnail': None,
        'cache.xǁDerivativeCacheǁlarger_fresh_thumbnail': None,
        'cache.xǁDerivativeCacheǁ_convert_and_store': None,
        'storages.disk.xǁDiskStorageǁdelete': None,
        'storages.disk.xǁDiskStorageǁ_delete_derivatives': None,
        'engines.scheduling.xǁFailureMemoryǁforget': None,
        'cache.xǁDerivativeCacheǁoriginal_changed': None,
        'cache.xǁDerivativeCacheǁensure_pyramid': None,
        'iiif.x_is_offered': None,
    },
    "front's counters and deadlines": {
        # Connections and requests per client and in total, the waiting room, the head, body, lingering and
        # answer deadlines, counting a connection out.
        'front.xǁFrontǁadmit': None,
        'front.xǁFrontǁtake': None,
        'front.xǁFrontǁcount_in': None,
        'front.xǁFrontǁdispatch': None,
        'front.xǁFrontǁcount_against': None,
        'front.xǁFrontǁthread_done': None,
        'front.xǁFrontǁrequest_done': None,
        'front.xǁFrontǁabandon': None,
        'front.xǁFrontǁrelease': None,
        'front.xǁFrontǁseconds_to_next_deadline': None,
        'front.xǁFrontǁnext_deadline': None,
        'front.xǁFrontǁstart_lingering': None,
        'front.xǁFrontǁexpire': None,
        'front.xǁFrontǁunhurry': None,
        'front.xǁFrontǁrefuse_waiting': None,
        'front.xǁFrontǁclose': None,
        'front.xǁFrontǁforget': None,
        'waiting_room.xǁWaitingRoomǁenter': None,
        'waiting_room.xǁWaitingRoomǁmost': None,
        'waiting_room.xǁWaitingRoomǁfits': None,
        'waiting_room.xǁWaitingRoomǁleave': None,
        'waiting_room.xǁWaitingRoomǁnext_waiting': None,
        'waiting_room.xǁWaitingRoomǁexpired': None,
        'waiting_room.xǁWaitingRoomǁnext_deadline': None,
        'waiting_room.x_kind_of': None,
        'front.xǁRequestReaderǁfill': None,
        'front.xǁSenderǁdeadline': None,
    },
}
SCOPE = {function: limits for functions in AREAS.values() for function, limits in functions.items()}
SCOPE_LINES = {}   # {function: [text of single lines also in scope]}


def split_name(function):
    """(module, mangled name) of mutmut's name of a function: 'storages.disk.xǁDiskStorageǁpath' gives
    ('storages.disk', 'xǁDiskStorageǁpath'); 'iiif.x_fit' gives ('iiif', 'x_fit')."""
    at = min(i for i in (function.find('.x_'), function.find('.xǁ')) if i >= 0)
    return function[:at], function[at + 1:]


def module_path(module, root=ROOT):
    """The file of a module named with dots."""
    return os.path.join(root, *module.split('.')) + '.py'


def source_of(function):
    """The source text of a function in SCOPE ('module.x_name' or 'module.xǁClassǁname'), from the module itself."""
    module, mangled = split_name(function)
    path = module_path(module)
    with open(path, encoding='utf-8') as f:
        text = f.read()
    *owner, name = mangled[2:].split('ǁ') if mangled.startswith('xǁ') else [mangled[2:]]
    body = ast.parse(text).body
    if owner:
        body = next((node.body for node in body if isinstance(node, ast.ClassDef) and node.name == owner[0]), [])
    found = next((node for node in body if isinstance(node, ast.FunctionDef) and node.name == name), None)
    return found and ast.get_source_segment(text, found)


def check_scope():
    """Every function in SCOPE exists, and its line limits are in it: else say so before a long run."""
    problems = []
    for function, limits in SCOPE.items():
        source = source_of(function)
        if source is None:
            problems.append(f'{function}: no such function')
        for text in (limits or ()) + tuple(SCOPE_LINES.get(function, ())):
            if source is not None and text not in source:
                problems.append(f'{function}: no line containing {text!r}')
    if problems:
        sys.exit('bench/mutation.py: SCOPE does not match the code:\n  ' + '\n  '.join(problems))


def mutant_diff(module_text, spans, function, number):
    """(index of the first changed line in the original function, the -/+ lines) of one mutant."""
    lines = module_text.split('\n')

    def block(key):
        first, last = spans[key]
        return lines[first - 1:last]
    original, mutant = block(f'{function}__mutmut_orig'), block(f'{function}__mutmut_{number}')
    mutant = [line.replace(f'__mutmut_{number}', '__mutmut_orig') for line in mutant]
    changed = [line for line in difflib.unified_diff(original, mutant, lineterm='', n=0)
               if line[:1] in '-+' and not line.startswith(('---', '+++'))]
    matcher = difflib.SequenceMatcher(None, original, mutant, autojunk=False)
    first = next((i1 for tag, i1, *_ in matcher.get_opcodes() if tag != 'equal'), 0)
    return original, first, changed


def in_scope(function, original, first):
    """Whether a mutant of `function` changing original line `first` is in scope."""
    limits = SCOPE[function]
    if limits is None:
        return True
    single = [i for i, line in enumerate(original)
              if any(text in line for text in SCOPE_LINES.get(function, []))]
    start = next(i for i, line in enumerate(original) if limits[0] in line)
    end = next(i for i, line in enumerate(original) if i >= start and limits[1] in line)
    return start <= first <= end or first in single


def mutmut_files(module):
    """(the mutated module's text, mutmut's line spans of its functions, its exit codes by mutant name)."""
    path = module_path(module, os.path.join(ROOT, 'mutants'))
    with open(path, encoding='utf-8') as f:
        text = f.read()
    with open(path + '.spans', encoding='utf-8') as f:
        spans = json.load(f)['spans']
    with open(path + '.meta', encoding='utf-8') as f:
        codes = json.load(f)['exit_code_by_key']
    return text, spans, codes


def results():
    """{mutant name: (status, diff lines)} of every mutant in scope, from mutmut's files in mutants/."""
    from mutmut.stats import status_by_exit_code
    found = {}
    for module in sorted({split_name(name)[0] for name in SCOPE}):
        text, spans, codes = mutmut_files(module)
        for name, code in codes.items():
            function, _, number = name.rpartition('__mutmut_')
            if function not in SCOPE:
                continue
            original, first, changed = mutant_diff(text, spans, split_name(function)[1], number)
            if in_scope(function, original, first):
                found[name] = (status_by_exit_code[code], changed)
    return found


COLUMNS = ('killed', 'timeout', 'survived', 'no tests')


def area_of(name):
    function = name.rpartition('__mutmut_')[0]
    return next(area for area, functions in AREAS.items() if function in functions)


def table(found):
    """The score table, per area and in all: killed, timeout, survived, no test reaches it, score (killed of all)."""
    rows = [('| area | killed | timeout | survived | no test reaches it | other | score |'),
            ('|---|---:|---:|---:|---:|---:|---:|')]
    for area in [*AREAS, 'all']:
        counts = collections.Counter(status for name, (status, _) in found.items()
                                     if area == 'all' or area_of(name) == area)
        total = sum(counts.values())
        other = total - sum(counts[column] for column in COLUMNS)
        cells = [str(counts[column]) for column in COLUMNS] + [str(other), f'{100 * counts["killed"] / max(total, 1):.1f}%']
        rows.append(f'| {area} | ' + ' | '.join(cells) + ' |')
    return rows


def report(found, label, seconds, cpu_seconds):
    """The score, the table and the survivors, as text."""
    counts = collections.Counter(status for status, _ in found.values())
    total = len(found)
    lines = [f'mutation testing ({label}): {counts["killed"]} killed of {total} '
             f'({100 * counts["killed"] / max(total, 1):.1f}%) in {seconds:.0f} s ({cpu_seconds:.0f} s of CPU)',
             'by status: ' + ', '.join(f'{status} {n}' for status, n in sorted(counts.items())), '',
             *table(found), '']
    for name in sorted(found, key=lambda n: (n.rpartition('__mutmut_')[0], int(n.rpartition('_')[2]))):
        status, changed = found[name]
        if status != 'killed':
            lines.append(f'{status}: {name}')
            lines.extend('    ' + line.strip() for line in changed)
    return '\n'.join(lines) + '\n'


GENERATE = """
import os
from mutmut.__main__ import (copy_also_copy_files, copy_src_dir, create_mutants, set_mutant_under_test,
                             setup_source_paths)
set_mutant_under_test('mutant_generation')
os.makedirs('mutants', exist_ok=True)
copy_src_dir()
copy_also_copy_files()
setup_source_paths()
create_mutants({children})
"""


def in_scope_mutants(children, log):
    """The names of the mutants in scope: made first as `mutmut run` makes them (its own steps, mutmut 3.8.1), so
    that the mutants of lines out of scope are never run."""
    subprocess.run([sys.executable, '-c', GENERATE.format(children=children)], cwd=ROOT, stdout=log,
                   stderr=subprocess.STDOUT, check=True)
    names = []
    for module in sorted({split_name(name)[0] for name in SCOPE}):
        text, spans, codes = mutmut_files(module)
        for name in codes:
            function, _, number = name.rpartition('__mutmut_')
            if function in SCOPE and in_scope(function, *mutant_diff(text, spans, split_name(function)[1],
                                                                      number)[:2]):
                names.append(name)
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--max-children', type=int, default=2)
    parser.add_argument('--label', default='current tests')
    parser.add_argument('--carry', metavar='FILE', help='mutants an earlier run of the same code killed with '
                        'fewer tests (a killed.txt): counted killed without running them again, as the tests only grew')
    args = parser.parse_args()
    check_scope()
    os.makedirs(OUT, exist_ok=True)
    shutil.rmtree(os.path.join(ROOT, 'mutants'), ignore_errors=True)     # no stale results or test stats
    mutmut = os.path.join(os.path.dirname(sys.executable), 'mutmut')
    started = time.time()
    with open(os.path.join(OUT, 'mutation.log'), 'w') as log:
        names = in_scope_mutants(args.max_children, log)
        carried = set()
        if args.carry:
            with open(args.carry, encoding='utf-8') as f:
                carried = set(f.read().split()) & set(names)
        subprocess.run([mutmut, 'run', '--max-children', str(args.max_children),
                        *(name for name in names if name not in carried)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = results()
    for name in carried:
        found[name] = ('killed', found[name][1])
    with open(os.path.join(OUT, 'killed.txt'), 'w', encoding='utf-8') as f:
        f.write(''.join(f'{name}\n' for name, (status, _) in sorted(found.items()) if status == 'killed'))
    text = report(found, args.label, time.time() - started, used.ru_utime + used.ru_stime)
    with open(os.path.join(OUT, 'mutation.txt'), 'w', encoding='utf-8') as f:
        f.write(text)
    print('\n\n'.join(text.split('\n\n')[:2]))
    print('survivors and their diffs: bench/out/mutation.txt')


if __name__ == '__main__':
    os.chdir(ROOT)
    main()
