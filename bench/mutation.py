"""Mutation testing of the security rules with mutmut (slow, so not part of CI): `make mutation`.

Mutates only the functions in SCOPE (names, tokens, static access, storage paths, offload, the
migration's checks), runs for each mutant the tests of setup.cfg's [mutmut] section that reach
the mutated function, and writes the score and every surviving mutant's diff to
bench/out/mutation.txt (mutmut's own log to bench/out/mutation.log). Run it with a Python that
has mutmut and the project's requirements installed; it starts from a fresh mutants/ folder.

    python bench/mutation.py [--max-children N] [--label TEXT]
"""

import argparse
import collections
import difflib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'bench', 'out')

# mutmut's name of each function in scope; (first, last) keeps only the mutants of the lines
# from the one containing `first` to the one containing `last` (the rest of the function is out of scope).
SCOPE = {
    'core.x_name_problem': None,
    'core.x_valid_name': None,
    'core.x_valid_scale': None,
    'core.x_thumbnail_name': None,
    'core.x_is_thumbnail_of': None,
    'core.xǁLayoutǁfolder_parts': None,
    'core.xǁLayoutǁowns_thumbnail': None,
    'core.xǁLayoutǁis_static_parts': None,
    'core.x_may_run_scripts': None,
    'server.x_make_token': None,
    'server.x_token_problem': None,
    'server.x_require_token': None,
    'server.xǁTokenCheckǁapply': None,
    'server.x_static': None,
    'server.x_getfileref': None,
    'server.xǁDiskStorageǁpath': None,
    'server.xǁDiskStorageǁoriginal_path': None,
    'server.xǁDiskStorageǁsend_static': None,
    'server.xǁDiskStorageǁ_delete_thumbnails': None,
    'server.x_send_file': ('if config.FILE_OFFLOAD:', "return bottle.HTTPResponse('', 200"),
    'migrate.x_expected_etag': None,
    'migrate.x_is_checkable': None,
    'migrate.x_same_object': None,
    'migrate.x_folder_files': None,
    'migrate.x_bucket_objects': None,
    'migrate.x_local_matches': None,
    'migrate.x_from_s3': ('elif local_matches(target, size, etag):', "counts['already there'] += 1"),
    'migrate.x_download_one': ('verified = os.path.getsize(temp) == size', 'verified = os.path.getsize(temp) == size'),
}
SCOPE_LINES = {}   # {function: [text of single lines also in scope]}


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


def results():
    """{mutant name: (status, diff lines)} of every mutant in scope, from mutmut's files in mutants/."""
    from mutmut.stats import status_by_exit_code
    found = {}
    for module in sorted({name.split('.')[0] for name in SCOPE}):
        with open(os.path.join(ROOT, 'mutants', module + '.py'), encoding='utf-8') as f:
            text = f.read()
        with open(os.path.join(ROOT, 'mutants', module + '.py.spans'), encoding='utf-8') as f:
            spans = json.load(f)['spans']
        with open(os.path.join(ROOT, 'mutants', module + '.py.meta'), encoding='utf-8') as f:
            codes = json.load(f)['exit_code_by_key']
        for name, code in codes.items():
            function, _, number = name.rpartition('__mutmut_')
            if function not in SCOPE:
                continue
            original, first, changed = mutant_diff(text, spans, function.split('.', 1)[1], number)
            if in_scope(function, original, first):
                found[name] = (status_by_exit_code[code], changed)
    return found


def report(found, label, seconds):
    """The score and the survivors, as text."""
    counts = collections.Counter(status for status, _ in found.values())
    total = len(found)
    lines = [f'mutation testing ({label}): {counts["killed"]} killed of {total} '
             f'({100 * counts["killed"] / max(total, 1):.1f}%) in {seconds:.0f} s',
             'by status: ' + ', '.join(f'{status} {n}' for status, n in sorted(counts.items())), '']
    for name in sorted(found, key=lambda n: (n.rpartition('__mutmut_')[0], int(n.rpartition('_')[2]))):
        status, changed = found[name]
        if status != 'killed':
            lines.append(f'{status}: {name}')
            lines.extend('    ' + line.strip() for line in changed)
    return '\n'.join(lines) + '\n'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--max-children', type=int, default=2)
    parser.add_argument('--label', default='current tests')
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    shutil.rmtree(os.path.join(ROOT, 'mutants'), ignore_errors=True)     # no stale results or test stats
    mutmut = os.path.join(os.path.dirname(sys.executable), 'mutmut')
    started = time.time()
    with open(os.path.join(OUT, 'mutation.log'), 'w') as log:
        subprocess.run([mutmut, 'run', '--max-children', str(args.max_children),
                        *[f'{name}__mutmut_*' for name in SCOPE]], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    text = report(results(), args.label, time.time() - started)
    with open(os.path.join(OUT, 'mutation.txt'), 'w', encoding='utf-8') as f:
        f.write(text)
    print(text.split('\n\n')[0])
    print('survivors and their diffs: bench/out/mutation.txt')


if __name__ == '__main__':
    os.chdir(ROOT)
    main()
