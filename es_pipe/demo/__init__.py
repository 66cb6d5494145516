"""The application around the library: ``es-pipe demo``, the training harness that the
demo and the benchmarks share, and their reports. The library (everything outside this
package and the CLI) never imports it."""

from es_pipe.demo.command import RECOMMENDED, add_demo_parser, demo_main
from es_pipe.demo.lm import ByteLM, build_corpus, decode, lm_task, load_tokens, read_shards

__all__ = [
    "RECOMMENDED",
    "ByteLM",
    "add_demo_parser",
    "build_corpus",
    "decode",
    "demo_main",
    "lm_task",
    "load_tokens",
    "read_shards",
]
