"""The stored split on real Redis: seeded once, kept across restarts, promoted, rolled back,
changed atomically by concurrent writers; and the ``tandem variants`` commands on it."""

from __future__ import annotations

import threading

import pytest
from typer.testing import CliRunner

from feature_store.splits import Split, SplitError, SplitStore, SplitVariant
from tandem.cli import app


def configured(b_share: float = 0.1, salt: str = "s") -> Split:
    return Split(
        salt=salt,
        control="a",
        variants=(
            SplitVariant(name="a", share=1 - b_share),
            SplitVariant(name="b", share=b_share, adapter="rec-v2"),
            SplitVariant(name="s", shadow=True),
        ),
    )


@pytest.fixture
def store(redis_url: str, namespace: str):
    store = SplitStore.connect(redis_url, namespace)
    yield store
    store.close()


def test_the_configured_split_is_stored_once_and_a_restart_keeps_a_promote(store: SplitStore):
    first, stored = store.ensure(configured())
    assert stored and first.version == 1 and first.reason == "configured"
    again, stored = store.ensure(configured())  # a second gateway, or a restart
    assert not stored and again == first
    promoted = store.promote("b")
    after_restart, stored = store.ensure(configured())
    assert not stored and after_restart == promoted and promoted.version == 2


def test_a_changed_configuration_replaces_the_stored_split(store: SplitStore):
    store.ensure(configured(0.1))
    changed, stored = store.ensure(configured(0.2))
    assert stored and changed.version == 2 and changed.variant("b").share == 0.2
    resalted, stored = store.ensure(configured(0.2, salt="other"))
    assert stored and resalted.version == 3 and resalted.salt == "other"


def test_rollback_restores_the_previous_split_under_a_new_version(store: SplitStore):
    original, _ = store.ensure(configured())
    promoted = store.promote("b")
    assert promoted.control == "b" and promoted.variant("b").share == 1.0
    restored = store.rollback()
    assert restored.version == 3 and restored.reason == "rollback to v1"
    assert restored.model_dump(exclude={"version", "reason", "activated_at"}) == (
        original.model_dump(exclude={"version", "reason", "activated_at"})
    )
    with pytest.raises(SplitError, match="nothing to roll back to"):
        store.rollback()


def test_unknown_or_redundant_promotes_are_refused(store: SplitStore):
    with pytest.raises(SplitError, match="no split stored"):
        store.promote("a")
    store.ensure(configured())
    with pytest.raises(SplitError, match="no variant 'zz'"):
        store.promote("zz")
    store.promote("b")
    with pytest.raises(SplitError, match="already serves 100%"):
        store.promote("b")


def test_concurrent_changes_are_never_lost(store: SplitStore, redis_url: str, namespace: str):
    store.ensure(configured())
    errors: list[BaseException] = []
    done: list[int] = []

    def flip(name: str) -> None:
        own = SplitStore.connect(redis_url, namespace)
        try:
            for _ in range(10):
                try:
                    done.append(own.promote(name).version)
                except SplitError as exc:  # another thread left it on this variant already
                    assert "already serves" in str(exc)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=flip, args=(n,)) for n in ("a", "b", "s")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    doc = store.read()
    assert doc is not None and doc.active.version == 1 + len(done) == max(done)
    assert sorted(done) == list(range(2, 2 + len(done)))  # every change got its own version
    versions = [doc.active.version, *(s.version for s in doc.history)]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)


def test_the_cli_shows_promotes_and_rolls_back(store: SplitStore, redis_url: str, namespace):
    runner = CliRunner()
    where = ["--redis-url", redis_url, "--namespace", namespace]
    missing = runner.invoke(app, ["variants", "show", *where])
    assert missing.exit_code == 2 and "no split" in missing.output
    store.ensure(configured())
    shown = runner.invoke(app, ["variants", "show", *where])
    assert shown.exit_code == 0, shown.output
    assert "v1" in shown.output and "90.0%" in shown.output and "control" in shown.output
    promoted = runner.invoke(app, ["variants", "promote", "b", *where])
    assert promoted.exit_code == 0 and "100.0%" in promoted.output
    assert store.read().active.control == "b"  # type: ignore[union-attr]
    rolled = runner.invoke(app, ["variants", "rollback", *where])
    assert rolled.exit_code == 0 and "rollback to v1" in rolled.output
    unknown = runner.invoke(app, ["variants", "promote", "zz", *where])
    assert unknown.exit_code == 2 and "no variant 'zz'" in unknown.output
    assert "Traceback" not in unknown.output


def test_promote_refuses_an_adapter_the_vllm_server_does_not_serve(
    store: SplitStore, redis_url: str, namespace: str
):
    store.ensure(configured())
    closed = "http://127.0.0.1:9"  # nothing listens: the check cannot pass
    out = CliRunner().invoke(
        app,
        ["variants", "promote", "b", "--redis-url", redis_url, "--namespace", namespace,
         "--vllm-url", closed],
    )  # fmt: skip
    assert out.exit_code == 2 and "cannot check" in out.output
    assert store.read().active.control == "a"  # type: ignore[union-attr]
