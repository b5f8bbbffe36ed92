"""``tandem ranker train``: train the LLM ranker (LoRA + projectors); ``ranker_head`` and
``ranker_runs`` add the other ``tandem ranker`` commands."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tandem.console import console, fail

app = typer.Typer(
    help="Stage 2: the LLM ranker (hybrid prompts, one-pass letter scoring, LoRA SFT).",
    no_args_is_help=True,
)


class PromptMode(StrEnum):
    full = "full"
    compact = "compact"
    pointer = "pointer"


class CandidateMode(StrEnum):
    sampled = "sampled"
    retrieved = "retrieved"


class Precision(StrEnum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


LLM_PARENT = "llm"  # parents.json key of the base LLM a run trains on
PRECISION_HELP = "bf16 autocast, fp32, or auto: bf16 only where the device has bf16 units."
DEVICE_HELP = "Where training runs; a run started on one device resumes on either."
RUN_HELP = "A run folder, 'none' to go without, or leave out for the newest run."


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="Prepared dataset name.")] = "ml-100k",
    llm: Annotated[
        Path | None, typer.Option(help="Base LLM folder; default <artifacts>/llm.")
    ] = None,
    retriever_run: Annotated[str | None, typer.Option(help=RUN_HELP)] = None,
    items_run: Annotated[
        str | None,
        typer.Option(help=RUN_HELP + " Without one, item tokens use retriever embeddings."),
    ] = None,
    captions_run: Annotated[str | None, typer.Option(help=RUN_HELP)] = None,
    preferences_run: Annotated[str | None, typer.Option(help=RUN_HELP)] = None,
    prompt: Annotated[
        PromptMode,
        typer.Option(
            help="'compact': 10 history items, titles cut to 10 tokens. 'pointer': the CPU "
            "recipe, a ~40-token prompt of soft tokens (user + one signal token per candidate)."
        ),
    ] = PromptMode.pointer,
    persona: Annotated[bool, typer.Option(help="MLLM4Rec role-play opening.")] = True,
    preference: Annotated[bool, typer.Option(help="CoT-Rec preference text.")] = True,
    item_tokens: Annotated[bool, typer.Option(help="Item soft tokens (RSLLM).")] = True,
    user_token: Annotated[bool, typer.Option(help="User soft token (CIT-Rec).")] = True,
    relative_signals: Annotated[
        bool,
        typer.Option(help="Pointer prompt: signal columns relative to the candidate list."),
    ] = False,
    signal_embeddings: Annotated[
        bool,
        typer.Option(
            help="Pointer prompt: signal columns in the retriever's vector space (off: a ranker "
            "trained on a --holdout-last teacher's lists can serve the full retriever; use "
            "with --no-user-token)."
        ),
    ] = True,
    titles: Annotated[
        bool, typer.Option(help="Show item titles (off: items are their soft token only).")
    ] = True,
    max_history: Annotated[int | None, typer.Option(min=0, help="History items shown.")] = None,
    candidates: Annotated[
        CandidateMode,
        typer.Option(
            help="'sampled': target + negatives, shuffled (LlamaRec). 'retrieved': the "
            "retriever's top-20 in its order, as served (examples it missed are skipped)."
        ),
    ] = CandidateMode.retrieved,
    curriculum: Annotated[
        str,
        typer.Option(help="Candidate counts of the first stages, e.g. '4,8' (then 20)."),
    ] = "",
    curriculum_examples: Annotated[
        int, typer.Option(min=1, help="Examples each curriculum stage lasts.")
    ] = 2000,
    distill_weight: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="KL weight towards the retriever's softmax (default 0.5; 0 if residual)."
        ),
    ] = None,
    residual: Annotated[
        bool,
        typer.Option(
            help="Train the fused system: the loss reads the retriever's log-softmax plus the "
            "ranker's logits, so the ranker learns what the retriever misses."
        ),
    ] = False,
    distill_examples: Annotated[
        int, typer.Option(min=0, help="Examples over which the KL weight falls to 0 (0: kept).")
    ] = 15000,
    aux_weight: Annotated[
        float,
        typer.Option(min=0.0, help="Per-candidate probe loss on signal tokens (training only)."),
    ] = 1.0,
    shuffle: Annotated[
        bool,
        typer.Option(
            help="Show retrieved candidates in a random order (off: retriever order, where the "
            "letter is the rank and a ranker can learn the letter instead of the evidence)."
        ),
    ] = True,
    trends: Annotated[
        bool, typer.Option(help="Candidates carry recent popularity (7/30 days) at decision time.")
    ] = True,
    covisit: Annotated[
        bool,
        typer.Option(help="Candidates carry other people's co-visitation with the history."),
    ] = False,
    side_features: Annotated[
        bool, typer.Option(help="Item rows gain popularity, year and genres.")
    ] = True,
    lora_targets: Annotated[
        str, typer.Option(help="Comma-separated module names LoRA adapts.")
    ] = "q_proj,k_proj,v_proj,o_proj",
    lora_r: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 8,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear warm-up steps.")] = 10,
    decay_examples: Annotated[
        int,
        typer.Option(min=0, help="Cosine learning-rate decay to 10% over N examples; 0 = none."),
    ] = 0,
    max_steps: Annotated[
        int,
        typer.Option(min=1, help="Optimizer steps in total (the time budget usually stops first)."),
    ] = 100_000,
    max_minutes: Annotated[
        float, typer.Option(min=0.1, help="Wall-clock budget of this session.")
    ] = 60.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward.")] = 32,
    grad_accum: Annotated[int, typer.Option(min=1, help="Forwards per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(min=0.0, help="LoRA learning rate.")] = 1e-3,
    projector_lr: Annotated[float, typer.Option(min=0.0, help="Projector learning rate.")] = 2e-3,
    projector_hidden: Annotated[
        int, typer.Option(min=0, help="Projector MLP width (0: the LLM's; narrow for few lists).")
    ] = 0,
    stage1_steps: Annotated[
        int, typer.Option(min=0, help="RSLLM stage 1: first steps train projectors only.")
    ] = 0,
    hard_negative_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of negatives from retriever top-20.")
    ] = 0.5,
    steps_per_user: Annotated[
        int, typer.Option(min=0, help="Most recent steps of each sequence used (0 = all).")
    ] = 0,
    part_dropout: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Drop each prompt part per example.")
    ] = 0.0,
    precision: Annotated[Precision, typer.Option(help=PRECISION_HELP)] = Precision.auto,
    threads: Annotated[int, typer.Option(min=1, help="torch threads (1 on a shared CPU).")] = 1,
    device: Annotated[Device, typer.Option(help=DEVICE_HELP)] = Device.cpu,
    valid_users: Annotated[int, typer.Option(min=0, help="Validation users.")] = 64,
    eval_every: Annotated[int, typer.Option(min=0, help="Steps between validations.")] = 100,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 25,
    seed: Annotated[int, typer.Option(help="Seed of examples, negatives and init.")] = 0,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this run folder from its checkpoint.")
    ] = None,
) -> None:
    """LoRA SFT with the loss on the answer letter; projectors train along; resumable.

    The defaults are the CPU recipe measured in benchmarks/results/ranker_learning.md: the
    pointer prompt, the retriever's top-20 as candidates, listwise distillation, the probe
    loss, side features and recent popularity. Train it on a pruned LLM:
    `tandem llm prepare --layers 2 --out artifacts/llm-2`, then `--llm artifacts/llm-2`.
    """
    import torch
    import transformers

    from ranker.inputs import InputRuns, load_inputs, resolve_inputs
    from ranker.prompts import PromptConfig
    from ranker.train import TRAIN_CONFIG_FILE, TrainConfig, train_ranker
    from tandem.artifacts import Manifest, new_run_id, runs_dir
    from tandem.data import Dataset
    from tandem.paths import artifacts_root, dataset_dir

    transformers.utils.logging.disable_progress_bar()
    if device is Device.cuda and not torch.cuda.is_available():
        fail("--device cuda: torch sees no CUDA device here (this torch may be a CPU build)")
    root = artifacts_root()
    llm_dir = llm or root / "llm"
    try:
        data = Dataset.load(dataset_dir(dataset))
        if resume is not None:
            run_dir = resume
            config = TrainConfig.from_json((run_dir / TRAIN_CONFIG_FILE).read_text())
            config = _budgets(config, max_steps, max_minutes, threads, device.value)
            parents = _partial_parents(run_dir)
            runs = InputRuns.from_parents(parents)
            # the LLM the run started on (recorded since runs record it), unless --llm says
            llm_dir = llm or Path(parents.get(LLM_PARENT, llm_dir))
        else:
            prompt_options = {
                "persona": persona,
                "preference": preference,
                "item_soft_tokens": item_tokens,
                "user_soft_token": user_token,
                "item_titles": titles,
            }
            if prompt is PromptMode.pointer:  # its own defaults; only these switches apply
                prompt_options = {
                    "user_soft_token": user_token,
                    "relative_signals": relative_signals,
                    "signal_embeddings": signal_embeddings,
                }
            if max_history is not None:
                prompt_options["max_history"] = max_history
            base = {
                PromptMode.full: PromptConfig,
                PromptMode.compact: PromptConfig.compact,
                PromptMode.pointer: PromptConfig.pointer,
            }[prompt]
            config = TrainConfig(
                prompt=base(**prompt_options),
                candidates=candidates.value,
                curriculum=_counts(curriculum),
                curriculum_examples=curriculum_examples,
                distill_weight=(0.0 if residual else 0.5)
                if distill_weight is None
                else distill_weight,
                residual=residual,
                distill_examples=distill_examples,
                aux_weight=aux_weight,
                trends=trends,
                covisit=covisit,
                shuffle=shuffle,
                side_features=side_features,
                target_modules=tuple(t.strip() for t in lora_targets.split(",") if t.strip()),
                lora_r=lora_r,
                warmup_steps=warmup_steps,
                decay_examples=decay_examples,
                max_steps=max_steps,
                max_minutes=max_minutes,
                batch_size=batch_size,
                grad_accum=grad_accum,
                lr=lr,
                projector_lr=projector_lr,
                projector_hidden=projector_hidden,
                stage1_steps=stage1_steps,
                hard_negative_ratio=hard_negative_ratio,
                steps_per_user=steps_per_user,
                part_dropout=part_dropout,
                precision=precision.value,
                threads=threads,
                device=device.value,
                valid_users=valid_users,
                eval_every=eval_every,
                checkpoint_every=checkpoint_every,
                seed=seed,
            )
            runs = resolve_inputs(
                root,
                dataset,
                retriever=retriever_run,
                items=items_run,
                captions=captions_run,
                preferences=preferences_run,
            )
            run_dir = runs_dir(root, dataset, "ranker") / new_run_id("ranker")
            run_dir.mkdir(parents=True)
            (run_dir / "parents.json").write_text(
                _json({**runs.to_parents(), LLM_PARENT: str(llm_dir)})
            )
        inputs = load_inputs(data, runs)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    console.print(f"run folder: {run_dir}")
    for name, path in runs.to_parents().items():
        console.print(f"  {name}: {path}")
    result = _train_with_progress(train_ranker, inputs, llm_dir, run_dir, config, runs, resume)
    manifest = Manifest.read(result.run_dir)
    table = Table(title=f"Ranker {result.run_dir.name}", show_header=False)
    for key, value in manifest.metrics.items():
        table.add_row(key, str(value))
    table.add_row("saved to", str(result.run_dir))
    console.print(table)
    if result.stopped_by == "max_minutes":
        console.print(f"budget reached: continue with `tandem ranker train --resume {run_dir}`")


def _counts(text: str) -> tuple[int, ...]:
    """'4,8' -> (4, 8); each count must be 2..20."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--curriculum takes comma-separated numbers, got {text!r}") from None
    if any(not 2 <= c <= 20 for c in counts):
        raise ValueError(f"--curriculum counts must be between 2 and 20, got {text!r}")
    return counts


def _json(value) -> str:
    import json

    return json.dumps(value, indent=2)


def _partial_parents(run_dir: Path) -> dict[str, str]:
    import json

    path = run_dir / "parents.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a ranker run folder (no parents.json)")
    return json.loads(path.read_text())


def _budgets(config, max_steps: int, max_minutes: float, threads: int, device: str):
    """What a resumed session may change: its budgets, threads and device."""
    from dataclasses import replace

    return replace(
        config, max_steps=max_steps, max_minutes=max_minutes, threads=threads, device=device
    )


def _train_with_progress(train_fn, inputs, llm_dir, run_dir, config, runs, resume):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        "{task.fields[status]}",
        console=console,
    ) as progress:
        task = progress.add_task("training", total=config.max_steps, status="")

        def on_progress(state, rate: float) -> None:
            status = f"loss {state.last_loss:.3f}  {rate:.2f} ex/s"
            progress.update(task, completed=state.step, status=status)

        try:
            return train_fn(
                inputs,
                llm_dir,
                run_dir,
                config,
                parents={**runs.to_parents(), LLM_PARENT: str(llm_dir)},
                resume=resume is not None,
                on_progress=on_progress,
                on_log=progress.console.print,
            )
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc))
