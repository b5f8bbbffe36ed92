"""``tandem serve``: the online stack, embedded in one process or as one of its services."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from tandem.console import fail


def serve(
    role: Annotated[
        Literal["embedded", "gateway", "retrieval"],
        typer.Option(
            help="embedded: gateway + in-process retrieval + embedded Redis + in-process ranker. "
            "gateway / retrieval: one service, as compose and Kubernetes run them.",
        ),
    ] = "embedded",
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to bind.")] = 8000,
    retriever_run: Annotated[
        Path | None, typer.Option(help="Retriever run dir (env TANDEM_RETRIEVER_RUN).")
    ] = None,
    ranker_backend: Annotated[
        Literal["inprocess", "vllm", "none"] | None,
        typer.Option(help="Ranker backend (env TANDEM_RANKER_BACKEND, default inprocess)."),
    ] = None,
    ranker_run: Annotated[
        Path | None, typer.Option(help="Ranker run dir (env TANDEM_RANKER_RUN).")
    ] = None,
    rank_weight: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="0 = retriever order, 1 = ranker alone."),
    ] = None,
) -> None:
    """Serve POST /recommend (and /retrieve with --role retrieval) until Ctrl-C / SIGTERM.

    Everything else comes from TANDEM_* environment variables or .env (see
    services/common/settings.py): Redis URL, retrieval URL, vLLM URL, deadlines, API keys.
    """
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from services.common.settings import GatewaySettings, RetrievalSettings
    from services.common.variants import problems
    from services.serve import StartupError, run

    given = {
        "retriever_run": retriever_run,
        "ranker_backend": ranker_backend,
        "ranker_run": ranker_run,
        "rank_weight": rank_weight,
    }
    overrides = {key: value for key, value in given.items() if value is not None}
    try:
        if role == "retrieval":
            retrieval = RetrievalSettings(
                **{k: v for k, v in overrides.items() if k == "retriever_run"}
            )
            run(role, host, port, retrieval=retrieval)
        else:
            run(role, host, port, gateway=GatewaySettings(**overrides))
    except ValidationError as exc:
        fail(f"invalid settings: {problems(exc)}")
    except SettingsError as exc:  # e.g. TANDEM_VARIANTS that is not JSON
        fail(f"invalid settings: {exc}")
    except StartupError as exc:
        fail(f"cannot start the {role} service: {exc}")
