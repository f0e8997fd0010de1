"""The Ray pieces that need no Serve deployment: the single-machine service never imports Ray; the ingress's
shard client asks a call again where a replica died or held another memory version (stand-in handles); a shard
process lets a version go only once the searches under way are answered; and
`rac memory add --ray` on a two-node cluster of its own (Ray Data) writes the single-machine add's memory,
unsharded or shard by shard.

Ray comes with the `ray` extra (`make test` installs it); without it the Ray tests skip, except in CI (CI=true
or RAC_REQUIRE_RAY=1), where they fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from loadtests.server import ROOT
from models.memory.shards import shard
from service.app import create_app
from service.memory.shards import shard_dirs
from service.settings import Settings
from tests.helpers import need_ray, png, rows


def test_the_single_machine_service_never_imports_ray() -> None:
    code = (
        "import sys, service.app, service.serve, service.__main__, rac.cli\n"
        "from service.app import create_app; from service.settings import Settings\n"
        "create_app(Settings())\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


class Ref:
    """A stand-in for a Ray call's result: its value, or the error it raises."""

    def __init__(self, value: object):
        self.value = value

    def result(self) -> object:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class Method:
    def __init__(self, answers: list[object]):
        self.answers, self.calls = answers, 0

    def remote(self, *args: object) -> Ref:
        self.calls += 1
        return Ref(self.answers.pop(0))


class Process:
    """A stand-in shard process: its gather answers in turn (what its connection answers), its loads (Ray calls)."""

    def __init__(self, name: str, answers: list[object], loads: list[object] | None = None):
        self._actor_id = name.encode()  # what the client tells processes apart by (its .hex())
        self.answers, self.calls = answers, 0
        self.load = Method(loads or [])

    def send(self, method: str, args: tuple[object, ...]) -> Ref:
        """The client's Peer for this process is the process itself (see `direct`)."""
        assert method == "gather"
        self.calls += 1
        return Ref(self.answers.pop(0))


def direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """RayShards over stand-ins: a process's calls go to the stand-in itself, Ray calls return their value."""
    from service.cluster import shards as cluster

    monkeypatch.setattr(cluster.ray, "get", lambda ref, timeout=None: ref.result())
    monkeypatch.setattr(cluster.RayShards, "peer", lambda self, process: process)


class Deployment:
    """A stand-in shard deployment: what its replicas name as their processes, one list a broadcast."""

    def __init__(self, *named: list[Process] | Exception):
        self.deployment_name, self.named = "shard-x", list(named)

    def broadcast(self, method: str) -> Broadcast:
        assert method == "process"
        return Broadcast(self.named.pop(0) if len(self.named) > 1 else self.named[0])


class Broadcast:
    def __init__(self, processes: list[Process] | Exception):
        self.processes = processes

    def results(self, timeout_s: float) -> list[Process]:
        if isinstance(self.processes, Exception):
            raise self.processes
        return self.processes


@pytest.mark.ray
def test_a_shard_call_a_dying_process_failed_goes_to_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """RayShards over stand-in deployments and processes: a call that fails with a dead process's error goes to
    the shard's other process, and the dead one is not asked again even where its replica still names it; a
    replica started in its place is found; a call a process of another memory version refused is sent again; a
    shard's own error is not; when no process answers, ShardsUnavailable (503)."""
    need_ray()
    import ray

    from service.cluster import shards as cluster
    from service.cluster.wire import Gone
    from service.memory.shards import At, ShardsUnavailable, StaleShard

    direct(monkeypatch)
    died = ray.exceptions.ActorDiedError()
    broke = Gone("10.0.0.7:4711: Connection reset by peer")  # the process died during the call
    stale = StaleShard("shard 0 holds memory version a, not b")  # a process of the version being replaced
    dying, flaky = Process("a", [broke]), Process("b", [stale, (0, 5, "v"), (0, 5, "w")])
    steady = Process("c", [(5, 9, "v"), (5, 9, "w")])
    client = cluster.RayShards([Deployment([dying, flaky]), Deployment([steady])])  # type: ignore[list-item]
    at, ids = At("b", "/memory/b"), [np.arange(2), np.arange(2)]
    assert client.gather(ids, True, True, at) == [(0, 5, "v"), (5, 9, "v")]
    assert (dying.calls, flaky.calls, steady.calls, client.retried) == (1, 2, 1, 2)
    client.refreshed = -1e9  # ask the deployments again: shard 0's still names the dead process
    assert client.gather(ids, True, True, at) == [(0, 5, "w"), (5, 9, "w")]
    assert dying.calls == 1

    replaced = Process("e", [(0, 5, "v")])  # the replica Serve started in place of the one that died
    client = cluster.RayShards([Deployment([Process("d", [died])], [replaced])])  # type: ignore[list-item]
    assert client.gather(ids[:1], True, True, at) == [(0, 5, "v")]
    with pytest.raises(ValueError):
        one = Deployment([Process("f", [ValueError("bad ids")])])
        cluster.RayShards([one]).gather(ids[:1], True, True, at)  # type: ignore[list-item]
    with pytest.raises(ShardsUnavailable):  # no process left: the request answers 503
        cluster.RayShards([Deployment([Process("g", [died])])]).gather(ids[:1], True, True, at)  # type: ignore[list-item]


@pytest.mark.ray
def test_each_shard_sends_its_calls_to_all_its_processes_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two shards of two processes each: four calls reach each process twice (a count shared by the shards
    would send every call of shard 0 to its first process and every call of shard 1 to its second)."""
    need_ray()
    from service.cluster import shards as cluster
    from service.memory.shards import At

    direct(monkeypatch)
    processes = [[Process(f"{s}{p}", [(s, p)] * 2) for p in range(2)] for s in range(2)]
    client = cluster.RayShards([Deployment(ps) for ps in processes])  # type: ignore[misc]
    for _ in range(4):
        client.gather([np.arange(1), np.arange(1)], False, True, At("v", "/memory/v"))
    assert [[p.calls for p in ps] for ps in processes] == [[2, 2], [2, 2]]


@pytest.mark.ray
def test_a_version_load_waits_for_shards_still_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard deployment with no replica running yet (the application starting) is waited for, not a refusal:
    its process, once named, loads the version; a process that refuses the version refuses the switch."""
    need_ray()
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    from service.artifacts import ArtifactError
    from service.cluster import shards as cluster
    from service.memory.shards import ShardInfo

    direct(monkeypatch)
    monkeypatch.setattr(cluster, "RELOAD_PAUSE_S", 0.01)
    info = ShardInfo(0, 1, 5, "v")
    starting = DeploymentUnavailableError(DeploymentID(name="shard-x", app_name="rac"))
    late = Process("a", [], [info])
    client = cluster.RayShards([Deployment(starting, starting, [late])])  # type: ignore[list-item]
    assert client.load(Path("/memory/v")) == [info]
    assert late.load.calls == 1
    refusing = Process("b", [], [ArtifactError("shard 0 of /memory/v: keys.npy is short")])
    with pytest.raises(ArtifactError, match="could not load"):
        cluster.RayShards([Deployment([refusing])]).load(Path("/memory/v"))  # type: ignore[list-item]


@pytest.mark.ray
def test_a_shard_process_lets_a_version_go_only_after_its_searches(
    synthetic_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ShardServer (no cluster: its listener on this host's address) searched over its connection while the
    version is dropped: the drop waits for the search, which answers in full; the next search of that version
    loads it again from its directory."""
    need_ray()
    import threading

    from service.cluster.shards import ShardServer
    from service.cluster.wire import Peer
    from service.memory.shards import At, Shard

    sharded = tmp_path / "sharded"
    shard(synthetic_artifacts, sharded, 2)
    server = ShardServer(str(sharded), 0, 1)
    (version,) = server.versions
    at, held = At(version, str(sharded)), server.versions[version]
    inside, go_on = threading.Event(), threading.Event()
    search = Shard.search

    def slow(self: Shard, *args: object) -> object:
        inside.set()
        assert go_on.wait(30)
        return search(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Shard, "search", slow)
    z = np.ones((1, held.memory.dim), np.float32) / np.sqrt(held.memory.dim)
    call = Peer(server.address(), 30.0).send("search", (z, 5, False, None, at))
    assert inside.wait(30)
    dropping = threading.Thread(target=server.drop, args=(version,))
    dropping.start()
    dropping.join(0.3)
    assert dropping.is_alive() and version not in server.versions  # no new call finds it; this one goes on
    go_on.set()
    assert (call.result().ids[0] >= 0).all()
    dropping.join(10)
    assert not dropping.is_alive()
    monkeypatch.setattr(Shard, "search", search)
    assert (server.search(z, 5, False, None, at).ids[0] >= 0).all() and version in server.versions
    server.listener.close()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_data_add_equals_the_single_machine_add(zs_artifacts: Path, tmp_path: Path) -> None:
    """`rac memory add --ray` on a two-node cluster of its own (Ray Data: an encoder actor on each node) writes
    the memory the single-machine `rac memory add` writes for the same list: the same ids, keys, tags, texts
    and thumbnails, keys and values within float16 rounding, and the same answers."""
    need_ray()
    from loadtests.ray_cluster import ray_cluster

    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(40):
        (images / f"{i}.png").write_bytes(png(30_000 + i))
        lines.append(json.dumps({"image": f"{i}.png", "label": i % 10, "key": f"new/{i}", "tags": [f"t{i % 3}"]}))
    (tmp_path / "new.jsonl").write_text("\n".join(lines))
    add = [sys.executable, "-m", "rac.cli", "memory", "add", "--from", str(zs_artifacts), "--list"]
    add += [str(tmp_path / "new.jsonl"), "--images", str(images)]
    subprocess.run([*add, "--out", str(tmp_path / "here")], cwd=ROOT, check=True, capture_output=True)
    shard(zs_artifacts, tmp_path / "split", 2)  # and a sharded memory, grown shard by shard
    grow = [*add, "--out", str(tmp_path / "split-ray"), "--ray"]
    grow[grow.index(str(zs_artifacts))] = str(tmp_path / "split")
    with ray_cluster() as cluster:
        done = subprocess.run(
            [*add, "--out", str(tmp_path / "ray"), "--ray"], cwd=ROOT, env=cluster.env, text=True, capture_output=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        grown = subprocess.run(grow, cwd=ROOT, env=cluster.env, text=True, capture_output=True)
        assert grown.returncode == 0, grown.stderr[-2000:]
    assert "on Ray (2 actors)" in done.stderr
    shard(tmp_path / "here", tmp_path / "resharded", 2)
    for part, whole in zip(shard_dirs(tmp_path / "split-ray"), shard_dirs(tmp_path / "resharded"), strict=True):
        np.testing.assert_array_equal(np.load(part / "ids.npy"), np.load(whole / "ids.npy"))
        assert rows(part / "items.sqlite") == rows(whole / "items.sqlite")
        np.testing.assert_allclose(np.load(part / "keys.npy"), np.load(whole / "keys.npy"), rtol=0, atol=2e-3)
    assert rows(tmp_path / "split-ray" / "items.sqlite") == rows(tmp_path / "here" / "items.sqlite")
    here, ray = tmp_path / "here", tmp_path / "ray"
    np.testing.assert_array_equal(np.load(ray / "ids.npy"), np.load(here / "ids.npy"))
    for name in ("keys.npy", "values.npy"):
        a, b = np.load(ray / name).astype(np.float32), np.load(here / name).astype(np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3)  # float16: one unit in the last place at most
        assert (a == b).mean() > 0.99
    assert rows(ray / "items.sqlite") == rows(here / "items.sqlite")  # ids, texts, keys, tags, thumbnails
    with (
        TestClient(create_app(Settings(artifacts=here))) as want,
        TestClient(create_app(Settings(artifacts=ray))) as got,
    ):
        for i in range(0, 40, 8):
            files = {"image": ("x.png", png(30_000 + i), "image/png")}
            w, g = (c.post("/classify?neighbors=10", files=files).json() for c in (want, got))
            assert [n["id"] for n in g["neighbors"]] == [n["id"] for n in w["neighbors"]]
            assert g["neighbors"][0]["key"] == f"new/{i}"  # the item itself, found by its image
            for gp, wp in zip(g["predictions"], w["predictions"], strict=True):
                assert gp["label"] == wp["label"] and gp["probability"] == pytest.approx(wp["probability"], abs=1e-4)
