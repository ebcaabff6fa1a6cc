"""Norms across processes (segclip/distributed.py): 2 CPU processes on gloo, started once for the
whole file (torch.multiprocessing spawn), every collective bounded by a timeout so that a hang fails
in seconds. Each rank runs every check and writes its findings; the tests below read them."""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import segclip

WORLD = 2
TIMEOUT_S = 120  # the whole spawned run; each collective gets COLLECTIVE_TIMEOUT_S
COLLECTIVE_TIMEOUT_S = 20

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is unavailable")


def _rel(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-30)


def _model() -> torch.nn.Module:
    # Sizes that shard unevenly over 2 ranks (7, 3) and a 1-element bias (one rank's shard is empty).
    return torch.nn.Sequential(torch.nn.Conv2d(3, 7, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(7 * 4 * 4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))


def _sharded_backward(rank: int) -> tuple[torch.nn.Module, list, object]:
    """_model() sharded with FSDP2 (each Conv2d/Linear a unit, then the root) on a mesh of all ranks,
    after one backward of each rank's own batch (FSDP reduces the gradients)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.manual_seed(1 + rank)
    model(torch.randn(4, 3, 6, 6)).square().sum().backward()
    return model, list(model.parameters()), mesh


def _fsdp_checks(rank: int, out: dict) -> None:
    from torch.distributed.tensor import DTensor

    model, params, mesh = _sharded_backward(rank)  # each rank its own batch: FSDP reduces the gradients
    assert all(isinstance(p.grad, DTensor) for p in params)
    saved = [p.grad.to_local().clone() for p in params]

    def restore():
        for p, s in zip(params, saved):
            p.grad.to_local().copy_(s)

    for norm_type in (2.0, 1.0, math.inf):
        restore()
        if norm_type != math.inf:
            want = torch.nn.utils.clip_grad_norm_(params, 0.05, norm_type=norm_type).full_tensor()
            want_grads = [p.grad.to_local().clone() for p in params]
        else:
            # torch's inf norm raises on the rank whose shard of the 1-element bias is empty (and the
            # other rank then waits in its all-reduce); segclip skips empty shards. The reference:
            # the max over the full gradients, torch's coefficient and product.
            want = max(p.grad.full_tensor().abs().max() for p in params)
            coef = torch.clamp(0.05 / (want + 1e-6), max=1.0)
            want_grads = [s * coef for s in saved]
        restore()
        got = segclip.fused_clip_(params, 0.05, norm_type=norm_type)
        got_grads = [p.grad.to_local().clone() for p in params]
        out[f"fsdp_clip_{norm_type}"] = {
            "type": type(got).__name__, "placements": str(got.placements), "rel": _rel(got.full_tensor(), want),
            "local_is_global": _rel(got.to_local(), want),
            "grads": max(float(((a - b).abs() / b.abs().clamp_min(1e-30)).max()) for a, b in zip(got_grads, want_grads)
                         if a.numel()),
            "clipped": float(want) > 0.05}
    restore()
    # The comparison can fail: the local shards' norm alone is not the global norm.
    local_only = segclip.total_norm([p.grad.to_local() for p in params])
    out["fsdp_local_only_rel"] = _rel(local_only, torch.nn.utils.get_total_norm([p.grad for p in params]).full_tensor())

    want = torch.nn.utils.get_total_norm([p.grad for p in params])
    got = segclip.total_norm([p.grad for p in params])
    out["fsdp_total_norm"] = {"type": type(got).__name__, "rel": _rel(got.full_tensor(), want.full_tensor())}

    # clip_with_norm_ with torch's DTensor norm, against torch's clip_grads_with_norm_.
    torch.nn.utils.clip_grads_with_norm_(params, 0.05, want)
    want_grads = [p.grad.to_local().clone() for p in params]
    restore()
    segclip.clip_with_norm_(params, 0.05, want)
    out["fsdp_clip_with_norm"] = max(float((p.grad.to_local() - w).abs().max()) for p, w in zip(params, want_grads)
                                     if w.numel())
    restore()

    # Per-group norms of the sharded model: the global norm of each group.
    groups = {"conv": model[0].parameters(), "head": list(model[3].parameters()) + list(model[5].parameters())}
    norms = segclip.group_norms(groups)
    want_conv = torch.nn.utils.get_total_norm([p.grad for p in model[0].parameters()]).full_tensor()
    want_head = torch.nn.utils.get_total_norm([p.grad for p in params[2:]]).full_tensor()
    out["fsdp_groups"] = {"conv": _rel(norms["conv"], want_conv), "head": _rel(norms["head"], want_head),
                          "total": _rel(norms.total.full_tensor(), want.full_tensor())}

    # Mixed DTensor and plain gradients: a clear error, before any collective.
    plain = torch.nn.Parameter(torch.zeros(2))
    plain.grad = torch.ones(2)
    try:
        segclip.fused_clip_(params + [plain], 1.0)
        out["mixed"] = "no error"
    except ValueError as exc:
        out["mixed"] = str(exc)


def _tp_checks(rank: int, out: dict) -> None:
    """Tensor-parallel style placements: sharded and replicated DTensors in one call."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(5)  # the same full tensors on both ranks
    full = [torch.randn(9, 4), torch.randn(5), torch.randn(3, 3)]
    dts = [distribute_tensor(full[0], mesh, [Shard(0)]), distribute_tensor(full[1], mesh, [Replicate()]),
           distribute_tensor(full[2], mesh, [Shard(1)])]
    want64 = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in full]))
    got = segclip.total_norm(dts)
    out["tp_total_norm"] = {"rel": _rel(got.full_tensor(), want64),
                            "torch_rel": _rel(torch.nn.utils.get_total_norm(dts).full_tensor(), want64)}
    other_mesh = init_device_mesh("cpu", (1, WORLD))
    elsewhere = distribute_tensor(full[0], other_mesh, [Replicate(), Shard(0)])
    unreduced = DTensor.from_local(full[1] / WORLD, mesh, [Partial()], run_check=False)
    for name, bad in (("meshes", [dts[0], elsewhere]), ("partial", [dts[0], unreduced])):
        try:
            segclip.total_norm(bad)
            out[f"tp_{name}"] = "no error"
        except ValueError as exc:
            out[f"tp_{name}"] = str(exc)


def _grads(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * scale for s, scale in
            (((300, 70), 1.0), ((70,), 3.0), ((1000, 90), 0.01), ((5,), 100.0), ((64, 3, 3, 3), 0.3))]


def _shard(tensors: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """ZeRO-style: the flat concatenation cut in WORLD contiguous pieces, as views of the tensors."""
    sizes = [t.numel() for t in tensors]
    total = sum(sizes)
    lo, hi = rank * total // WORLD, (rank + 1) * total // WORLD
    pieces, start = [], 0
    for t in tensors:
        a, b = max(lo, start), min(hi, start + t.numel())
        if a < b:
            pieces.append(t.view(-1)[a - start:b - start])
        start += t.numel()
    return pieces


def _group_checks(rank: int, out: dict) -> None:
    group = dist.group.WORLD
    for norm_type in (2.0, 1.0, math.inf, 3.0):
        whole = _grads(7)  # the same on both ranks
        want64 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double(), norm_type)
                                                       for t in whole]), norm_type)
        one_process = [t.clone() for t in whole]
        params1 = [torch.nn.Parameter(torch.empty_like(t)) for t in one_process]
        for p, t in zip(params1, one_process):
            p.grad = t
        single = segclip.fused_clip_(params1, 1.0, norm_type=norm_type)
        shards = _shard(whole, rank)
        params = [torch.nn.Parameter(torch.empty_like(s)) for s in shards]
        for p, s in zip(params, shards):
            p.grad = s
        got = segclip.fused_clip_(params, 1.0, norm_type=norm_type, process_group=group)
        local = segclip.total_norm([s.clone() for s in _shard(_grads(7), rank)], norm_type=norm_type)
        out[f"pg_clip_{norm_type}"] = {
            "rel64": _rel(got, want64), "rel_single": _rel(got, single),
            "local_only_rel": _rel(local, want64),  # the comparison can fail
            # the clipped shards are the single process's clipped tensors, piece for piece
            "grads": max(float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())
                         for a, b in zip(shards, _shard(one_process, rank)))}
        tn = segclip.total_norm(_shard(_grads(7), rank), norm_type=norm_type, process_group=group)
        out[f"pg_total_norm_{norm_type}"] = _rel(tn, want64)

    # A rank without tensors still takes part, and gets the global norm.
    whole = _grads(8)
    want = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in whole]))
    mine = whole if rank == 0 else []
    out["pg_empty_rank"] = _rel(segclip.total_norm(mine, process_group=group), want)

    # Per-group norms with a group: one all-reduce for all of them.
    named = {"a": [torch.nn.Parameter(torch.empty(4))], "b": []}
    named["a"][0].grad = torch.full((4,), 1.0 + rank)  # rank 0: 4 x 1, rank 1: 4 x 2
    norms = segclip.group_norms(named, process_group=group)
    out["pg_groups"] = norms.to_dict()

    # NaN on one rank propagates to every rank, for the inf norm too (max drops NaN in some backends).
    nan = [torch.tensor([1.0, math.nan if rank == 1 else 2.0])]
    out["pg_nan_inf"] = float(segclip.total_norm(nan, norm_type=math.inf, process_group=group))
    out["pg_nan_2"] = float(segclip.total_norm(nan, process_group=group))

    # Inconsistent lists: a clear error on every rank, not a hang.
    for name, kwargs, tensors in (
            ("norm_type", {"norm_type": 2.0 if rank == 0 else math.inf}, [torch.ones(3)]),
            ("dtype", {}, [torch.ones(3, dtype=torch.float32 if rank == 0 else torch.float64)])):
        start = time.monotonic()
        try:
            segclip.total_norm(tensors, process_group=group, **kwargs)
            out[f"pg_inconsistent_{name}"] = {"error": None}
        except ValueError as exc:
            out[f"pg_inconsistent_{name}"] = {"error": str(exc), "s": time.monotonic() - start}
    named = {"a": [torch.nn.Parameter(torch.empty(3))]} if rank == 0 else \
        {"a": [torch.nn.Parameter(torch.empty(3))], "b": []}
    named["a"][0].grad = torch.ones(3)
    try:
        segclip.group_norms(named, process_group=group)
        out["pg_inconsistent_groups"] = None
    except ValueError as exc:
        out["pg_inconsistent_groups"] = str(exc)
    try:
        segclip.total_norm([torch.ones(3)], norm_type=0.0, process_group=group)
        out["pg_norm0"] = None
    except ValueError as exc:
        out["pg_norm0"] = str(exc)


def _clipper_checks(rank: int, out: dict) -> None:
    """clip_grad_value_, AutoClip and ZClip on FSDP2 (DTensor) gradients: the same clipped gradients
    as the same calls on the full gradients in one process (the trainer's --fsdp --clip-mode value /
    auto / zscore)."""
    model, params, mesh = _sharded_backward(rank)
    saved = [p.grad.to_local().clone() for p in params]
    full = [p.grad.full_tensor() for p in params]  # every rank: the whole gradient
    # Per call, the gradients times a factor (a spike at the 4th), so the clippers' histories matter,
    # and each parameter's by its own weight, so the ranks' shares of the norm change from call to call.
    factors = (1.0, 0.5, 2.0, 40.0, 1.0)

    def weight(i: int, k: int) -> float:
        return factors[k] * (0.2 + (i + k) % 3)

    def run(make, sharded: bool):
        clipper, norms, grads = make(), [], []
        for k, f in enumerate(factors):
            if sharded:
                for i, (p, s) in enumerate(zip(params, saved)):
                    p.grad.to_local().copy_(s * weight(i, k))
                n = clipper(params) if clipper is not None else segclip.clip_grad_value_(params, 0.3 * f)
                grads.append([p.grad.full_tensor() for p in params])
            else:
                plain = [torch.nn.Parameter(torch.zeros_like(g)) for g in full]
                for i, (q, g) in enumerate(zip(plain, full)):
                    q.grad = g * weight(i, k)
                n = clipper(plain) if clipper is not None else torch.nn.utils.clip_grad_value_(plain, 0.3 * f)
                grads.append([q.grad for q in plain])
            if n is not None:
                norms.append(float(n.full_tensor() if hasattr(n, "full_tensor") else n))
        return norms, grads

    for name, make in (("value", lambda: None), ("auto", lambda: segclip.AutoClip(50.0)),
                       ("zclip", lambda: segclip.ZClip(z_thresh=1.0, warmup_steps=2))):
        got_norms, got = run(make, True)
        want_norms, want = run(make, False)
        rel = max(_rel(a, b) for a, b in zip(got_norms, want_norms)) if want_norms else 0.0
        diff = max(float((a - b).abs().max()) for ga, gb in zip(got, want) for a, b in zip(ga, gb))
        scale = max(float(b.abs().max()) for gb in want for b in gb)
        # the planted error: the reference's last call without clipping differs
        unclipped = max(float((b - g * weight(i, 3)).abs().max()) for i, (b, g) in enumerate(zip(want[3], full)))
        out[f"clipper_{name}"] = {"norm_rel": rel, "grad_rel": diff / scale, "spike_clipped": unclipped / scale}


def _scaler_checks(rank: int, out: dict) -> None:
    """The trainer's --fsdp --amp scaler (torch.amp.GradScaler; fp16 on CUDA) with an inf in one rank's
    shard only, through --clip fused (clip_optimizer_'s plain path: DTensor gradients) and --clip
    torch (unscale_, then clip_grad_norm_): every rank must skip the step and back off alike. torch
    2.14 reduces found_inf over the DTensor mesh inside unscale_. Run on the CPU (GradScaler("cpu"),
    float32 gradients)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for recipe in ("fused", "torch"):
        torch.manual_seed(0)
        model = _model()
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        before = [p.to_local().clone() for p in model.parameters()]
        torch.manual_seed(1 + rank)
        scaler.scale(model(torch.randn(4, 3, 6, 6)).square().sum()).backward()
        if rank == 1:  # an overflow in rank 1's shard of the first weight only
            next(model.parameters()).grad.to_local().view(-1)[0] = math.inf
        local_inf = any(bool(torch.isinf(p.grad.to_local()).any()) for p in model.parameters())
        if recipe == "fused":
            segclip.clip_optimizer_(opt, 1.0, scaler=scaler)
        else:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        scaler.step(opt)
        scaler.update()
        out[f"scaler_{recipe}"] = {
            "local_inf": local_inf,
            "stepped": any(not torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters())),
            "scale": float(scaler.get_scale()),
        }


def _agc_checks(rank: int, out: dict) -> None:
    """adaptive_clip_ on FSDP2 (DTensor, Shard(0)) parameters against the same call on the full
    parameters in one process; the naive call on each rank's shards as plain tensors is the contrast
    (its 1-d units are split, so their norms are wrong)."""
    model, params, mesh = _sharded_backward(rank)
    saved = [p.grad.to_local().clone() for p in params]
    full_w = [p.full_tensor() for p in params]
    full_g = [p.grad.full_tensor() for p in params]
    for norm_type in (2.0, 1.0, math.inf):
        for p, g in zip(params, saved):
            p.grad.to_local().copy_(g)
        segclip.adaptive_clip_(params, 0.01, norm_type=norm_type)
        got = [p.grad.full_tensor() for p in params]
        plain = [torch.nn.Parameter(w.clone()) for w in full_w]
        for q, g in zip(plain, full_g):
            q.grad = g.clone()
        segclip.adaptive_clip_(plain, 0.01, norm_type=norm_type)
        want = [q.grad for q in plain]
        naive = []
        for p, g in zip(params, saved):  # the shards as plain tensors: 1-d units split
            q = torch.nn.Parameter(p.to_local().detach().clone())
            q.grad = g.clone()
            naive.append(q)
        segclip.adaptive_clip_(naive, 0.01, norm_type=norm_type)
        scale = max(float(w.abs().max()) for w in want)
        err = max(float((a - b).abs().max()) for a, b in zip(got, want)) / scale
        local_err = max(float((q.grad - p.grad.to_local()).abs().max()) for q, p in zip(naive, params)
                        if q.numel()) / scale
        clipped = max(float((b - g).abs().max()) for b, g in zip(want, full_g)) / max(float(g.abs().max()) for g in full_g)
        out[f"agc_{norm_type}"] = {"err": err, "naive_err": local_err, "clipped": clipped}
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)  # the same full tensor on every rank
    cols = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    cols.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
    before = cols.grad.to_local().clone()
    try:
        segclip.adaptive_clip_([cols], 0.01)
        out["agc_shard1"] = "no error"
    except ValueError as exc:
        out["agc_shard1"] = str(exc) if torch.equal(before, cols.grad.to_local()) else "changed"


def _worker(rank: int, port: int, folder: str) -> None:
    out: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        torch.set_num_threads(1)
        for checks in (_group_checks, _fsdp_checks, _tp_checks, _clipper_checks, _scaler_checks, _agc_checks):
            checks(rank, out)
        dist.barrier()
    except BaseException:
        out["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} processes did not finish within {TIMEOUT_S} s (a hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD)]
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if "error" in res]
    assert not errors, "\n".join(errors)
    return results


def test_fsdp2_matches_torch_clip_grad_norm(ranks):
    for res in ranks:
        for norm_type in ("2.0", "1.0", "inf"):
            r = res[f"fsdp_clip_{norm_type}"]
            assert r["type"] == "DTensor" and r["placements"] == "(Replicate(),)"  # what torch returns
            assert r["clipped"]
            assert r["rel"] <= 1e-6 and r["local_is_global"] <= 1e-6, r
            assert r["grads"] <= 1e-6, r
        assert res["fsdp_local_only_rel"] > 1e-3  # the comparison above can fail
        assert res["fsdp_total_norm"]["type"] == "DTensor" and res["fsdp_total_norm"]["rel"] <= 1e-6
        assert res["fsdp_clip_with_norm"] <= 1e-7
        assert all(v <= 1e-6 for v in res["fsdp_groups"].values()), res["fsdp_groups"]


def test_dtensor_errors_and_tensor_parallel(ranks):
    for res in ranks:
        assert "plain" in res["mixed"] and "DTensor" in res["mixed"]
        assert res["tp_total_norm"]["rel"] <= 1e-6, res["tp_total_norm"]  # a replicated tensor counts once
        assert "device mesh" in res["tp_meshes"]
        assert "Partial" in res["tp_partial"]


def test_process_group_shards_match_one_process(ranks):
    for res in ranks:
        for norm_type in ("2.0", "1.0", "inf", "3.0"):
            r = res[f"pg_clip_{norm_type}"]
            assert r["rel64"] <= 1e-6 and r["rel_single"] <= 1e-6, r
            # The comparison can fail: a rank's own shards give another norm (for inf, on one rank).
            assert max(other[f"pg_clip_{norm_type}"]["local_only_rel"] for other in ranks) > 1e-3
            assert r["grads"] <= 1e-6, r
            assert res[f"pg_total_norm_{norm_type}"] <= 1e-6
        assert res["pg_empty_rank"] <= 1e-6
        assert res["pg_groups"]["a"] == pytest.approx(math.sqrt(4 * 1 + 4 * 4), rel=1e-6)
        assert res["pg_groups"]["b"] == 0.0
        assert res["pg_groups"]["total"] == pytest.approx(math.sqrt(20), rel=1e-6)
        assert math.isnan(res["pg_nan_inf"]) and math.isnan(res["pg_nan_2"])


def test_process_group_inconsistent_lists_raise_on_every_rank(ranks):
    for res in ranks:
        for name, words in (("norm_type", "norm_type differs"), ("dtype", "dtype differs")):
            r = res[f"pg_inconsistent_{name}"]
            assert r["error"] is not None and words in r["error"], r
            assert r["s"] < COLLECTIVE_TIMEOUT_S / 2  # an error, not a timeout
        assert "number of groups differs" in res["pg_inconsistent_groups"]
        assert "norm_type=0" in res["pg_norm0"]


def test_plain_tensors_need_no_group():
    # Without DTensors or a group, nothing distributed happens (DDP's case): no process group needed.
    assert not dist.is_initialized()
    grads = _grads(3)
    want = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in grads]))
    assert _rel(segclip.total_norm(grads), want) <= 1e-6


def test_value_autoclip_and_zclip_on_fsdp2_gradients_match_one_process(ranks):
    # clip_grad_value_ clamps each rank's shards; AutoClip and ZClip take the global norm (the same on
    # every rank, so every rank keeps the same history) and scale the shards by one coefficient.
    for res in ranks:
        for name in ("value", "auto", "zclip"):
            r = res[f"clipper_{name}"]
            assert r["norm_rel"] <= 1e-6 and r["grad_rel"] <= 1e-6, (name, r)
        assert res["clipper_auto"]["spike_clipped"] > 1e-2  # the 4th call's spike was clipped:
        assert res["clipper_zclip"]["spike_clipped"] > 1e-2  # the comparison can fail


def test_grad_scaler_agrees_across_ranks_on_an_inf_in_one_rank_s_shards(ranks):
    for recipe in ("fused", "torch"):
        got = [res[f"scaler_{recipe}"] for res in ranks]
        assert [r["local_inf"] for r in got] == [False, True]  # the ranks' own shards disagree ...
        assert [r["stepped"] for r in got] == [False, False], got  # ... their decisions do not:
        assert [r["scale"] for r in got] == [512.0, 512.0], got  # both skipped and backed off


def test_adaptive_clip_on_fsdp2_parameters_matches_one_process(ranks):
    # Rows (units of >= 2-d parameters) stay whole under Shard(0); the 1-d parameters' norms are
    # reduced over the mesh, so the result is the full model's in one process.
    for res in ranks:
        for norm_type in ("2.0", "1.0", "inf"):
            r = res[f"agc_{norm_type}"]
            assert r["clipped"] > 1e-3, r  # AGC acted
            assert r["err"] <= 2e-6, (norm_type, r)
    # The same call on each rank's shards as plain tensors splits the 1-d units: caught on the rank
    # whose shards of them are partial (the comparison above can fail).
    assert max(res["agc_2.0"]["naive_err"] for res in ranks) > 1e-3
    # Sharded on dim 1, a unit (a dim-0 slice) spans ranks: refused, nothing changed.
    assert all("Shard(0)" in res["agc_shard1"] and "placements" in res["agc_shard1"] for res in ranks), ranks[0]["agc_shard1"]
