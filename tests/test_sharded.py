"""The sharded strategy: the SVD of a row-sharded matrix against an exact float64 SVD, the FSDP2
estimate on Ray against single-process estimate_init on the same sample, what each worker and
the driver hold, and the strategy's choice and refusals."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from loraga_ray.core.sharded import ShardedAccumulator, ShardingError, repeated_blocks
from loraga_ray.core.sharded_svd import sharded_svd
from loraga_ray.jobs.init import run_init
from loraga_ray.jobs.init_strategy import PlanError, decide
from loraga_ray.options import InitOptions

GiB = 2**30


def planted(m: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """G = U diag(s) Vᵀ + a small tail: the top k singular values 1, 0.8, 0.64, ... (relative gaps
    of 20%, far above 1e-2), the tail at most 1e-3 of the top."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = min(m, n)
    s = torch.cat([0.8 ** torch.arange(k, dtype=torch.float64),
                   1e-3 * torch.rand(r - k, generator=g, dtype=torch.float64)])
    return (U[:, :r] * s) @ V[:, :r].T


def principal_cosines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of A and B (orthonormal)."""
    return torch.linalg.svdvals(A.double().T @ B.double())


def _svd_rank(rank: int, world: int, port: int, G: torch.Tensor, rows: list[int], k: int, exact: bool, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        start = sum(rows[:rank])
        U, S, V = sharded_svd(G[start:start + rows[rank]].float(), k, seed=7, exact=exact)
        queue.put((rank, U.numpy().copy(), S.numpy().copy(), V.numpy().copy()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_sharded_svd(G: torch.Tensor, rows: list[int], k: int, exact: bool = False):
    """sharded_svd over len(rows) gloo processes, rank i holding ``rows[i]`` rows of G."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_svd_rank, args=(r, len(rows), port, G, rows, k, exact, queue)) for r in range(len(rows))]
    for p in procs:
        p.start()
    out = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    U = torch.cat([torch.from_numpy(u) for _, u, _, _ in out])
    return U, torch.from_numpy(out[0][2]), torch.from_numpy(out[0][3]), out


@pytest.mark.parametrize("rows", [[96], [50, 46], [60, 36, 0]])
def test_sharded_svd_matches_exact_svd_on_a_planted_matrix(rows):
    """Randomized (q = 2k, 4 power iterations) on row shards, one of them empty: top-k principal
    angle cosines >= 0.9999 for U and V, singular values rtol 1e-4, against float64 torch.linalg.svd;
    every rank gets the same S and V."""
    k = 8
    G = planted(sum(rows), 80, k)
    Ur, Sr, Vhr = torch.linalg.svd(G, full_matrices=False)
    U, S, V, parts = run_sharded_svd(G, rows, k)
    assert U.shape == (sum(rows), k) and V.shape == (80, k)
    assert principal_cosines(Ur[:, :k], U).min() >= 0.9999
    assert principal_cosines(Vhr[:k].T, V).min() >= 0.9999
    torch.testing.assert_close(S.double(), Sr[:k], rtol=1e-4, atol=0)
    for _, _, S_i, V_i in parts:  # replicated outputs agree bit for bit
        assert (torch.from_numpy(S_i) == S).all() and (torch.from_numpy(V_i) == V).all()
    # the factors are orthonormal and reproduce the best rank-k approximation
    torch.testing.assert_close(U.double().T @ U.double(), torch.eye(k, dtype=torch.float64), atol=1e-5, rtol=0)
    best = (Ur[:, :k] * Sr[:k]) @ Vhr[:k]
    assert float(((U.double() * S.double()) @ V.double().T - best).norm() / best.norm()) < 1e-4


def test_sharded_svd_exact_mode_is_the_exact_svd():
    """``exact`` on shards of a low-rank matrix (rank 5 < k = 8: a Cholesky-based QR would break
    down): the exact singular values, to float64 rounding of a float32 input."""
    g = torch.Generator().manual_seed(1)
    G = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 30, generator=g, dtype=torch.float64)
    G = G.float().double()
    Sr = torch.linalg.svdvals(G)[:8]
    U, S, V, _ = run_sharded_svd(G, [23, 17], 8, exact=True)
    torch.testing.assert_close(S.double()[:5], Sr[:5], rtol=1e-6, atol=0)
    assert float(S[5:].abs().max()) < 1e-5 * float(S[0])
    recon = (U.double()[:, :5] * S.double()[:5]) @ V.double()[:, :5].T
    assert float((recon - G).norm() / G.norm()) < 1e-6


@pytest.mark.parametrize("rows", [[1, 1, 30, 30], [3, 3, 56, 0]])
def test_sharded_svd_of_a_rank_deficient_matrix_keeps_u_orthonormal(rows):
    """G of rank 1 on shards smaller than the sketch: the singular vectors beyond the rank still
    come out orthonormal (as torch.linalg.svd's do; LoRA-GA's B0 uses U[:, r:2r]), not zero."""
    G = torch.zeros(62, 20, dtype=torch.float64)
    G[5] = torch.randn(20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    U, S, V, _ = run_sharded_svd(G, rows, 3, exact=True)
    torch.testing.assert_close(U.double().T @ U.double(), torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(V.double().T @ V.double(), torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(S.double()[0], G[5].norm(), rtol=1e-6, atol=0)


def test_a_model_without_repeated_blocks_cannot_be_sharded():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    assert repeated_blocks(mlp) == []
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        with pytest.raises(ShardingError, match="no repeated blocks.*--init-strategy replicated"):
            ShardedAccumulator(mlp, ["0", "2"])
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# The strategy's choice, from the planner, before any model is loaded
# ------------------------------------------------------------------------------------------------

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16",
}


@pytest.fixture
def llama7b_dir(tmp_path):
    folder = tmp_path / "llama-2-7b-config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))
    return str(folder)


def probes(n: int, gib: int, cuda: bool = True) -> list[dict]:
    return [{"node": f"node{i}", "cuda": cuda, "device_bytes": gib * GiB} for i in range(n)]


def test_auto_picks_sharded_for_llama7b_on_four_24gib_gpus(llama7b_dir):
    opts = InitOptions(model=llama7b_dir, data="x", workers=4, dtype="bfloat16", max_rank=8, task="causal-lm",
                       max_length=512)
    d = decide(opts, "causal-lm", 2, probes(4, 24))
    assert d.strategy == "sharded" and d.reason == "replicated does not fit"
    assert d.per_worker_bytes <= 24 * GiB and d.batch_size >= 1


def test_llama7b_on_one_24gib_gpu_is_refused_with_the_numbers(llama7b_dir):
    opts = InitOptions(model=llama7b_dir, data="x", workers=1, dtype="bfloat16", max_rank=8, task="causal-lm")
    with pytest.raises(PlanError, match=r"fits under no strategy: per worker replicated [0-9.]+ GiB.*more workers"):
        decide(opts, "causal-lm", 2, probes(1, 24))
    asked = InitOptions(model=llama7b_dir, data="x", workers=2, dtype="bfloat16", init_strategy="sharded",
                        task="causal-lm")
    with pytest.raises(PlanError, match="--init-strategy sharded"):
        decide(asked, "causal-lm", 2, probes(2, 24))


def test_cpu_workers_share_their_node_memory(llama7b_dir):
    opts = InitOptions(model=llama7b_dir, data="x", workers=2, dtype="bfloat16", max_rank=8, task="causal-lm")
    two_on_one_node = [{"node": "a", "cuda": False, "device_bytes": 128 * GiB}] * 2
    d = decide(opts, "causal-lm", 2, two_on_one_node)  # 64 GiB each: replicated fits (13 + 13 + 26 GB)
    assert d.strategy == "replicated" and d.memory_bytes == 64 * GiB


def test_quantised_base_is_refused_before_any_worker(tmp_path):
    folder = tmp_path / "q"
    folder.mkdir()
    cfg = dict(LLAMA2_7B, num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=128,
               quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    (folder / "config.json").write_text(json.dumps(cfg))
    from loraga_ray.core.targets import QuantisedModelError

    with pytest.raises(QuantisedModelError, match="quantised"):
        decide(InitOptions(model=str(folder), data="x", workers=2, task="causal-lm"), "causal-lm", 2, probes(2, 24))


# ------------------------------------------------------------------------------------------------
# On Ray: equal to the single process, nothing model-sized on the driver
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    from test_distributed import reference, write_tiny_causal

    model, data = write_tiny_causal(tmp_path_factory.mktemp("sharded"))
    columns = dict(prompt_column="q", response_column="a")
    ref, _, tokens = reference(model, data, 23, 5, **columns)
    return {"model": model, "data": data, "columns": columns, "ref": ref, "tokens": tokens}


def sharded_options(causal, workers: int, **kw) -> InitOptions:
    # 23 samples in batches of 5 over the workers: the ranks' streams end at different steps
    base = dict(model=causal["model"], data=causal["data"], num_samples=23, batch_size=5, max_rank=2, svd="exact",
                max_length=24, progress=False, workers=workers, gpus_per_worker=0, init_strategy="sharded")
    return InitOptions(**(base | causal["columns"] | kw))


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_sharded_init_equals_single_process(ray_session, causal, tmp_path, workers):
    """FSDP2 over N gloo workers: the same artifact as single-process estimate_init (singular values
    rtol 1e-5, rank-k approximations 1e-4), every example counted once; each worker holds 1/N of
    the weights (+ one block) and of the sums; the driver receives about the artifact's size."""
    from test_distributed import assert_same

    from loraga_ray.core.artifact import FACTORS_FILE, InitArtifact

    art, summary = run_init(sharded_options(causal, workers, out=str(tmp_path / "init")))
    assert_same(art, causal["ref"])
    assert summary["strategy"] == "sharded" and summary["num_examples"] == 23
    assert summary["num_tokens"] == causal["tokens"]
    assert sum(summary["examples_per_worker"]) == 23
    loaded = InitArtifact.load(tmp_path / "init")
    assert loaded.meta["strategy"] == "sharded"
    assert loaded.meta["driver_bytes_received"] == summary["driver_bytes_received"]
    factors_bytes = os.path.getsize(tmp_path / "init" / FACTORS_FILE)
    assert summary["driver_bytes_received"] <= 1.1 * factors_bytes

    model = __import__("loraga_ray.models", fromlist=["load_model"]).load_model(causal["model"])
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in repeated_blocks(model))
    sums = sum(d_out * d_in * 4 for d_out, d_in in art.meta["shapes"].values())
    for m in summary["memory_per_worker"]:
        assert m["param_bytes"] <= whole / workers + block, m
        assert m["sum_bytes"] <= sums / workers + sums / len(art.meta["shapes"]), m  # chunking rounds up per layer
    if workers > 1:
        assert max(m["sum_bytes"] for m in summary["memory_per_worker"]) < sums


def test_sharded_init_of_a_classifier_equals_single_process(ray_session, tmp_path):
    """seq-cls (BERT, its new head seeded the same on every rank), 2 workers."""
    from test_distributed import assert_same, reference, reviews
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tiny import write_tiny_bert

    model = str(write_tiny_bert(tmp_path / "bert"))
    pq.write_table(pa.table(reviews(30)), tmp_path / "r.parquet")
    ref, _, _ = reference(model, str(tmp_path / "r.parquet"), 21, 4)
    art, summary = run_init(InitOptions(model=model, data=str(tmp_path / "r.parquet"), num_samples=21, batch_size=4,
                                        max_rank=2, svd="exact", max_length=24, progress=False, workers=2,
                                        gpus_per_worker=0, init_strategy="sharded"))
    assert_same(art, ref)
    assert summary["strategy"] == "sharded"


def test_randomized_sharded_init_matches_the_exact_estimate(ray_session, causal):
    """The default randomized SVD on the shards, against the exact single-process factors."""
    art, _ = run_init(sharded_options(causal, 2, svd="randomized"))
    ref = causal["ref"]
    for name in ref.target_modules:
        U, S, V = art.factors[name]
        Ur, Sr, Vr = ref.factors[name]
        torch.testing.assert_close(S, Sr, rtol=1e-4, atol=1e-6 * float(Sr[0]))


def test_replicated_reports_what_it_held(ray_session, causal):
    """Replicated: every worker holds the whole model and all the sums; the driver receives them."""
    opts = sharded_options(causal, 2, init_strategy="replicated")
    art, summary = run_init(opts)
    assert summary["strategy"] == "replicated"
    sums = sum(d_out * d_in * 4 for d_out, d_in in art.meta["shapes"].values())
    assert all(m["sum_bytes"] == sums for m in summary["memory_per_worker"])
    assert summary["driver_bytes_received"] == 2 * sums
    assert art.meta["strategy"] == "replicated"



def test_train_and_tune_hand_the_strategy_to_their_init():
    """``train``/``tune`` run the init themselves: --init-strategy reaches it, and a wrong value
    is refused before anything starts."""
    from loraga_ray.options import TrainOptions

    opts = TrainOptions(model="m", data="d", out="o", init_strategy="sharded", init_workers=4)
    init = opts.init_options(out=None, max_rank=8, task="causal-lm", num_labels=None)
    assert init.init_strategy == "sharded" and init.workers == 4
    with pytest.raises(ValueError, match="unknown --init-strategy .gathered.: use one of auto, replicated, sharded"):
        InitOptions(model="m", data="d", init_strategy="gathered").validate()
