"""
Thinking Slow, Fast (Paliotta et al. 2025), the test-time-scaling half: draw many chain-of-thought
samples per problem fast, score them, and time them; and the decode speed benchmark.

In this file: 1. the Sampler, one batched generation loop for every model kind: a left-padded prefill, then
one token per step from a preallocated cache (KV slots for attention, conv + SSM state for Mamba layers), each
step a captured CUDA graph on a GPU; 2. evaluation: coverage@k (unbiased pass@k) and majority@k against the
measured time to draw k samples of every problem, on one GPU or several (torchrun); 3. the decode benchmark.

Run:
  python sample.py --checkpoint out/pure                      # eval on out/data/test.jsonl, 64 samples each
  torchrun --nproc_per_node=2 sample.py --checkpoint out/pure --name pure_2gpu   # the same draw on 2 GPUs
  python sample.py --checkpoint out/teacher --data ../shared/data/gsm8k/test.jsonl --max_new_tokens 1024
  python sample.py --bench                                    # decode speed, Llama-3.2-1B shapes (GPU)
  python sample.py --bench --bench_shapes default --bench_batches "" --bench_gen_lens 256,512,1024,2048,4096
  python sample.py --help                                     # every option

Outputs (read by plot_scaling.py):
  out/eval/<name>/samples.jsonl  one line per sample, as batches finish (a rerun resumes): problem, sample
      (its index j < k), text, answer, gold, correct, tokens, time_s (its share of its batch's wall
      time), rank (the process that drew it), run (which invocation)
  out/eval/<name>/meta.json      the weights' fingerprint, the data's and the sampling settings: a
      resumed run must match them
  out/eval/<name>/summary.json   model, checkpoint, weights, device, gpus, n_problems, k [1, 2, 4, ...],
      coverage, majority, time_s (per k: measured seconds to draw k samples of every problem, rounds
      k = 1, 2, 4, ... one after the other), batch sizes, set-up time, the sampling settings
  out/bench/decode_<shapes>.json device, copy_GBps, date, torch, state_dtype, compile, results (one row per
      shape, model, batch, prompt_len, gen_len: tokens_per_s, decode_tokens_per_s, roofline_tokens_per_s,
      roofline_frac, peak_mem_GB, prefill_s, decode_s, graph_capture_s, method) and hf (HF generate)

Glossary (letters in shape comments):
  b  rows a sampler holds                n  rows of one call (<= b)
  l  prompt length after left padding    v  vocabulary size, d model width
  s  cache slots (prompt + new tokens)   c  candidate tokens kept by top-k before top-p
  t  the cache slot a decode step writes (a 0-d device tensor, so that one CUDA graph replays every step)
  r  rows of one prefill chunk           k  (evaluation) samples per problem: coverage@k, majority@k

Why one graph serves every step: a captured graph replays fixed kernels on fixed buffers, so the
slot t lives in a 0-d device tensor that the step increments itself, and the attention and conv
kernels (scan_kernel.py) read t and the padding from memory. The step is compiled before capture;
q, k, v run as one GEMM (fuse_qkv), top-k takes two passes (topk_by_chunks), and each row draws from
a hash of its own seed (row_uniforms): no host sync in a step, and a sample never depends on its batch.
"""
import glob
import json
import math
import os
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mamba_distill as md
from scan_kernel import InputError, copy_bandwidth, flag, parse_config, run_cli


@dataclass
class SampleConfig:
    # evaluation
    checkpoint: str = flag("out/hybrid", "checkpoint directory (teacher or student)")
    name: str = flag("", "a name for out_dir/eval/<name>/ (letters, digits, . _ -); empty = the checkpoint's")
    data: str = flag("", "GSM8K-format jsonl; empty = out_dir/data/test.jsonl (mamba_distill.py's test split)")
    out_dir: str = flag("out", "where eval/ and bench/ results go")
    n_problems: int = flag(200, "the first n problems of --data (0 = all)", at_least=0)
    k: int = flag(64, "samples per problem (a power of two); results at k = 1, 2, 4, ..., k", at_least=1)
    # sampling
    temperature: float = flag(0.8, "0 = greedy", at_least=0)
    top_p: float = flag(0.95, "nucleus sampling mass (1 = off)", above=0, at_most=1)
    top_k: int = flag(64, "candidates kept before top-p (exact within them); 0 = all, a full sort (slow)", at_least=0)
    max_new_tokens: int = flag(0, "new tokens per sample at most; 0 = the longest solution in --data + 25%", at_least=0)
    batch_size: int = flag(0, "most rows per batch; 0 = the largest that fits in GPU memory (each round runs in as "
                              "few equal batches as fit)", at_least=0)
    seed: int = flag(0, "sampling seed (each sample derives its own from it)", at_least=0)
    cuda_graph: bool = flag(True, "run the decode step as captured CUDA graphs (GPU only)")
    compile: bool = flag(True, "torch.compile the decode step before capturing it (GPU only; ~30 s per model)")
    state_dtype: str = flag("float32", "SSM state kept between decode steps: float32 (as vLLM's "
                                       "mamba_ssm_cache_dtype=float32), or model (the sampling dtype, bf16 on GPU, as "
                                       "mamba_ssm's inference cache: half the bytes, but a decay within 2^-9 of 1 "
                                       "rounds away, so slow heads stop forgetting)", choices=("float32", "model"))
    prefill_tokens: int = flag(32768, "prefill this many tokens at a time (rows are split to fit)", at_least=1)
    flexible_extract: bool = flag(False, "score a sample with no '####' line or \\boxed{} by the last number in its "
                                         "text (GSM8K's flexible extraction); off: it is unanswered")
    device: str = flag("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    # speed benchmark
    bench: bool = flag(False, "run the decode speed benchmark instead of an evaluation")
    bench_shapes: str = flag("llama-3.2-1b", "model shapes, random weights: llama-3.2-1b, llama-3.2-3b, default "
                                             "(the default run's teacher and its students)")
    bench_models: str = flag("teacher,pure,hybrid", "which models of each shape")
    bench_batches: str = flag("64,256", "batch sweep at prompt 128, 512 new tokens, plus the largest; empty = none")
    bench_gen_lens: str = flag("512,2048,4096,8192", "generation-length sweep, each at the largest batch that fits")
    max_batch: int = flag(4096, "--bench: the largest batch of a measurement at most", at_least=1)
    bench_e2e: bool = flag(False, "length sweep by full generate calls instead of timing the step at 8 points (slow)")
    bench_hf: bool = flag(True, "HF transformers generate side by side (batch 256, prompt 128, 512 new tokens)")
    attn_fraction: float = flag(md.HYBRID_ATTN_FRACTION, "share of attention layers the bench's hybrids keep",
                                at_least=0, at_most=1)


# -----------------------------------------------------------------------------
# 1. Sampling


TOPK_CHUNK_SIZE = 32  # ids per chunk in topk_by_chunks


def topk_by_chunks(logits, k, size=TOPK_CHUNK_SIZE):
    """logits.topk(k, dim=-1) for a large vocabulary, as (values, ids), sorted, in two cheap passes: the
    k largest values lie in the k chunks of `size` ids with the largest maxima (a chunk ranked below k
    has k values above all it holds), so top-k over the maxima, then over those chunks' k * size values.
    Chunk c holds ids c, c + n, ... so that the maxima reduce over contiguous rows. Same values as
    torch.topk (ties may pick another id), without its radix select, slow on large batches."""
    b, v = logits.shape
    if v % size or v < 4 * k * size:  # too small to gain (or ragged): the plain top-k
        return logits.topk(min(k, v), dim=-1)
    n = v // size
    chunks = logits.view(b, size, n).amax(1).topk(k, dim=-1).indices  # (b, k): the chunks of the k largest maxima
    ids = (chunks[:, :, None] + n * torch.arange(size, device=logits.device)).view(b, k * size)  # (b, k*size)
    vals, j = logits.gather(-1, ids).topk(k, dim=-1)  # (b, k) sorted, descending
    return vals, ids.gather(-1, j)  # (b, k), (b, k)


def row_uniforms(seeds, step, c):
    """(b, c) uniforms in (0, 1) from a counter-based hash of (row seed, step, candidate rank): what a
    row draws depends on its own seed alone, never on its batch or GPU. int64 never overflows; graph-safe."""
    m32 = 0xFFFFFFFF
    ranks = torch.arange(c, device=seeds.device)
    x = (seeds[:, None] * 0x9E3779B1 + step * 0x85EBCA77 + ranks * 0x27D4EB2F) & m32  # (b, c)
    for mul in (0x7FEB352D, 0x2C1B3C6D):  # two rounds of xor-shift-multiply (a 32-bit integer hash)
        x = ((x ^ (x >> 16)) * mul) & m32
    x = x ^ (x >> 15)
    return ((x >> 8).float() + 0.5) / 2 ** 24  # 24 random bits: exact in fp32, never 0 or 1


def sample_next(logits, temperature, top_k, top_p, seeds=None, step=0):
    """logits (b, v) -> next tokens (b,): greedy at temperature 0, else top-k then top-p (nucleus) at the
    temperature, randomness from row_uniforms(seeds, step) (None: torch's generator). No host sync."""
    if temperature == 0:
        return logits.argmax(-1)  # (b,)
    # top-k on the raw logits: dividing by a positive temperature keeps the order (top_k 0: all, sorted)
    vals, ids = topk_by_chunks(logits, top_k) if top_k > 0 else logits.sort(dim=-1, descending=True)  # (b, c) sorted
    vals = vals.float() / temperature
    if top_p < 1.0:
        probs = vals.softmax(-1)  # (b, c)
        # drop a candidate when the ones ranked above it already hold top_p of the mass
        vals = vals.masked_fill(probs.cumsum(-1) - probs > top_p, -math.inf)
    probs = vals.softmax(-1)  # (b, c)
    # exponential race: argmax p_i / E_i, E_i ~ Exp(1), picks i with probability p_i, with no host sync
    race = (torch.empty_like(probs).exponential_() if seeds is None  # (b, c) from torch's generator
            else -torch.log(row_uniforms(seeds, step, probs.shape[1])))  # (b, c) each row's own, Exp(1) by inversion
    return ids.gather(-1, (probs / race).argmax(-1, keepdim=True))[:, 0]  # (b,)


def clock(device):
    """Host seconds once the device has finished its queued work (a GPU runs behind the host)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def decode_state_dtype(cfg, dtype):
    """The SSM state's dtype between decode steps (--state_dtype). fp32 by default: in bf16 (8 significant
    bits) a decay above 1 - 2^-9 gives back the same number, so a slow head stops forgetting."""
    return dtype if cfg.state_dtype == "model" else torch.float32


def cache_bytes(model, batch, max_len, dtype, state_dtype):
    """Bytes of each layer's cache: KV slots for attention layers, conv + SSM state for Mamba ones."""
    cache = model.allocate_cache(batch, max_len, dtype, "meta", state_dtype)
    return [sum(t.numel() * t.element_size() for t in layer) for layer in cache]


def largest_batch(model, max_len, dtype, device, cap, prefill_tokens, state_dtype=torch.float32):
    """The most rows (a multiple of 8, at most cap unless 0) whose cache and step fit in free GPU memory.
    On a CPU: min(cap, 64)."""
    if torch.device(device).type != "cuda":
        return min(cap or 64, 64)
    c = model.cfg
    # per row: the cache, the output tokens, logits (bf16 + fp32 copies, top-k), the step's activations
    per_row = (sum(cache_bytes(model, 1, max_len, dtype, state_dtype)) + 8 * max_len + 12 * c.vocab_size
               + 64 * (c.hidden_size + c.intermediate_size))
    # prefill works on `prefill_tokens` tokens at a time: activations of one layer plus a scan's chunk states
    m = next((blk.mixer for blk in model.model.layers if hasattr(blk, "mixer")), None)
    per_token = 2 * (12 * c.hidden_size + 4 * c.intermediate_size) + (0 if m is None else 4 * m.h * m.p * m.n // 16)
    free = torch.cuda.mem_get_info(device)[0] - prefill_tokens * per_token - (2 << 30)
    return min(cap or math.inf, max(8, int(0.9 * free / per_row) // 8 * 8))


def fuse_qkv(model):
    """Each attention layer's q, k and v projections as one GEMM in forwards without gradients (narrow
    products leave SMs idle). The parameters become views of one stacked tensor, so names, state_dict
    and in-place writes are unchanged (new storage, as from model.to(), makes the Sampler refuse to run)."""
    for blk in model.model.layers:
        attn = getattr(blk, "self_attn", None)
        if attn is None or "qkv" in vars(attn):  # no attention, or fused already
            continue
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        w = torch.cat([p.weight for p in projs]).detach()  # (h*e + 2*g*e, d)
        sizes = [p.weight.shape[0] for p in projs]
        for p, part in zip(projs, w.split(sizes)):
            p.weight.data = part

        def qkv(x, attn=attn, w=w, sizes=sizes):  # autograd trains the parameters: three products then
            return type(attn).qkv(attn, x) if torch.is_grad_enabled() else F.linear(x, w).split(sizes, dim=-1)
        attn.qkv = qkv
    return model


class Sampler:
    """Batched generation with a preallocated cache of `batch` rows and `max_len` slots, reused across
    calls; a call of n rows uses the first n, with its own captured decode graph on a GPU (prepare(n)).
    Usage: Sampler(model, ...).generate(prompts, max_new_tokens, seeds=...)."""

    def __init__(self, model, batch, max_len, temperature=1.0, top_k=0, top_p=1.0, cuda_graph=True,
                 prefill_tokens=32768, dtype=None, compile=False, state_dtype=torch.float32, stop=None):
        p = next(model.parameters())
        self.model, self.batch, self.max_len = model, batch, max_len
        self.device, self.dtype = p.device, dtype or p.dtype
        # an fp32 model computes under autocast in the cache's dtype (no weight cache: graph capture)
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != p.dtype,
                                       cache_enabled=False)
        self.sampling, self.prefill_tokens = (temperature, top_k, top_p), prefill_tokens
        self.stop = stop or md.StopRule(model.cfg.vocab_size, device=self.device)
        fuse_qkv(model)  # one GEMM for q, k and v in every step (and prefill)
        # a captured graph (and the fused q, k, v) reads these addresses: generate() checks them
        self.weight_ptrs = [p.data_ptr() for p in model.parameters()]
        self.cache = model.allocate_cache(batch, max_len, self.dtype, self.device, state_dtype)
        # the decode step's inputs and outputs live in fixed buffers, so that a graph can replay it
        dev = dict(device=self.device)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, **dev)  # (b, 1) last token
        self.t = torch.zeros((), dtype=torch.long, **dev)  # cache slot of that token
        self.col = torch.zeros((), dtype=torch.long, **dev)  # its index among new tokens
        self.pad = torch.zeros(batch, dtype=torch.long, **dev)  # (b,) left padding per row
        self.seeds = torch.zeros(batch, dtype=torch.long, **dev)  # (b,) each row's sampling seed
        self.out = torch.zeros(batch, max_len, dtype=torch.long, **dev)  # (b, s) new tokens
        self.done = torch.zeros(batch, dtype=torch.bool, **dev)  # (b,) finished rows (StopRule)
        self.end = torch.zeros(batch, dtype=torch.long, **dev)  # (b,) tokens a finished row keeps
        self.phase = torch.zeros(batch, dtype=torch.long, **dev)  # (b,) answer-line watch
        # compiled (GPU only) with a symbolic batch size: one compilation serves every row count
        self.forward = torch.compile(model, dynamic=True) if compile and self.device.type == "cuda" else model
        self.use_graphs = cuda_graph and self.device.type == "cuda"
        self.graphs, self.pool, self.capture_s = {}, None, 0.0  # capture_s: seconds, compilation included

    def seek(self, t, col):
        """Point the next step at cache slot t, as new token col (writes to the device, no sync)."""
        self.t.fill_(t)
        self.col.fill_(col)

    def _rows(self, rows):
        """The cache of some rows (a prefill chunk, or the first n rows of a step)."""
        return [tuple(x[rows] for x in c) for c in self.cache]

    def _step(self, n):
        """One decode step on the first n rows: feed self.tok at slot self.t, sample, advance."""
        with self.autocast:
            logits = self.forward(self.tok[:n], self._rows(slice(0, n)), start=self.t, pad=self.pad[:n])  # (n, 1, v)
        nxt = sample_next(logits[:, -1], *self.sampling, seeds=self.seeds[:n], step=self.col)  # (n,)
        self.tok[:n, 0] = nxt
        self.out[:n].index_copy_(1, self.col.view(1), nxt[:, None])
        if self.stop.active:
            self.stop.update(nxt, self.col, self.phase[:n], self.done[:n], self.end[:n])
        self.t.add_(1)
        self.col.add_(1)

    @torch.no_grad()
    def prepare(self, n):
        """Capture the decode step of n rows as a CUDA graph (GPU, cuda_graph), once; the warm-up runs
        write garbage to the cache, which the next prefill resets."""
        if not self.use_graphs or n in self.graphs:
            return
        t0 = clock(self.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # torch.compile may finish its work on the second call
                self.seek(self.max_len - 1, 0)
                self._step(n)
        torch.cuda.current_stream().wait_stream(side)
        self.seek(self.max_len - 1, 0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(n)
        self.pool = graph.pool()
        self.graphs[n] = graph
        self.capture_s += clock(self.device) - t0

    def run_step(self, n):
        if n in self.graphs:
            self.graphs[n].replay()
        else:
            self._step(n)

    @torch.no_grad()
    def prefill(self, prompts, seeds, l):
        """Left-pad the prompts to length l, run the parallel forward into the cache, sample each first token."""
        n = len(prompts)
        dev = dict(dtype=torch.long, device=self.device)
        self.pad[:n] = torch.tensor([l - len(r) for r in prompts], **dev)  # (n,)
        # the pad id does not matter: padding reaches neither attention nor the SSM state
        idx = torch.tensor([[0] * (l - len(r)) + list(r) for r in prompts], **dev)  # (n, l)
        self.seeds[:n] = torch.tensor(seeds, dtype=torch.long)
        # a prefill continues from the SSM and conv state in the cache, so start from zero; so does the stop rule
        states = [x for c, blk in zip(self.cache, self.model.model.layers) if hasattr(blk, "mixer") for x in c]
        for x in states + [self.done, self.end, self.phase]:
            x[:n] = 0
        self.col.fill_(0)
        step = max(1, self.prefill_tokens // l)
        for i in range(0, n, step):
            rows = slice(i, min(i + step, n))
            with self.autocast:
                hidden = self.model(idx[rows], self._rows(rows), start=0, pad=self.pad[rows],
                                    return_hidden=True)  # (r, l, d)
                logits = self.model.lm_head(hidden[:, -1])  # (r, v): only the last position is needed
            self.tok[rows, 0] = sample_next(logits, *self.sampling, seeds=self.seeds[rows], step=self.col)
        self.out[:n, 0] = self.tok[:n, 0]
        if self.stop.active:
            self.stop.update(self.tok[:n, 0], self.col, self.phase[:n], self.done[:n], self.end[:n])
        self.seek(l, 1)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, seed=0, stop_ids=None, tokenizer=None, check_every=16,
                 seeds=None, prompt_len=0):
        """prompts: lists of token ids (at most self.batch) -> (new token lists, stats). seeds: one per
        prompt (default: seed * 1_000_003 + index). Rows stop as the StopRule says (with a tokenizer,
        answer_end() cuts what it missed); the host checks every `check_every` steps whether all have.
        stop_ids: replace the sampler's StopRule by one stopping at these tokens."""
        n = len(prompts)
        if not 0 < n <= self.batch:
            raise ValueError(f"got {n} prompts for a batch of {self.batch}")
        if [p.data_ptr() for p in self.model.parameters()] != self.weight_ptrs:
            raise RuntimeError("the model's weights were given new storage after this Sampler was built "
                               "(model.to(), load_state_dict(assign=True)): build a new Sampler")
        if stop_ids:
            self.stop = md.StopRule(self.model.cfg.vocab_size, stop_ids, tokenizer, self.device)
            self.graphs, self.pool = {}, None  # graphs read the rule's tables: capture again
        # padded to the longest prompt, or to prompt_len: then a row never depends on its batch
        l = max(prompt_len, max(len(p) for p in prompts))
        if l + max_new_tokens > self.max_len:
            raise InputError(f"prompt {l} + --max_new_tokens {max_new_tokens} > cache length {self.max_len}")
        seeds = list(seeds) if seeds is not None else [seed * 1_000_003 + i for i in range(n)]
        self.prepare(n)
        t0 = clock(self.device)
        self.prefill(prompts, seeds, l)
        t1 = clock(self.device)
        steps = 1  # tokens so far: prefill samples the first
        for steps in range(2, max_new_tokens + 1):
            self.run_step(n)
            if self.stop.active and steps % check_every == 0 and bool(self.done[:n].all()):  # syncs
                break
        out = self.out[:n, :steps].cpu().numpy()
        keep = torch.where(self.done[:n], self.end[:n], steps).tolist()
        rows = [out[i, :keep[i]].tolist() for i in range(n)]
        if tokenizer is not None:  # rows the rule did not stop: cut at an answer line it could not see
            rows = [r if d else r[:md.answer_end(r, tokenizer)] for r, d in zip(rows, self.done[:n].tolist())]
        t2 = clock(self.device)
        return rows, {"prefill_s": t1 - t0, "decode_s": t2 - t1, "steps": steps, "prompt_len": l}


# -----------------------------------------------------------------------------
# 2. Evaluation: rounds of samples, coverage and majority against time, one GPU or several


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of n samples, c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_answer(answers):
    """The most frequent non-None answer (ties: the one seen first); None if there is none."""
    votes = Counter(a for a in answers if a is not None)
    return votes.most_common(1)[0][0] if votes else None


def ks_up_to(k):
    return [2 ** i for i in range(k.bit_length())]  # 1, 2, 4, ..., k


def summarize(samples, n_problems, k_max):
    """coverage@k, majority@k and time@k from samples.jsonl rows. time@k: the wall time to have k
    samples of every problem, rounds k = 1, 2, 4, ... in turn, each as long as its slowest process
    (the sum of its samples' time_s); a round a resumed run finished adds that run's time."""
    by_problem = [[] for _ in range(n_problems)]
    for s in sorted(samples, key=lambda s: (s["problem"], s["sample"])):
        by_problem[s["problem"]].append(s)
    ks = ks_up_to(k_max)
    coverage = [sum(pass_at_k(len(ss), sum(s["correct"] for s in ss), k) for ss in by_problem) / n_problems for k in ks]
    majority = [sum(majority_answer([s["answer"] for s in ss[:k]]) == ss[0]["gold"] for ss in by_problem) / n_problems
                for k in ks]
    busy = Counter()  # (round, run, rank) -> seconds that process spent on the round
    for s in samples:  # round k draws samples k/2 to k - 1, so sample j's is 2 ** j.bit_length()
        busy[2 ** s["sample"].bit_length(), s.get("run", 0), s.get("rank", 0)] += s["time_s"]
    slowest = Counter()  # (round, run) -> the slowest process's time
    for (r, run, _), t in busy.items():
        slowest[r, run] = max(slowest[r, run], t)
    time_s = [sum(t for (r, _), t in slowest.items() if r <= k) for k in ks]
    return ks, coverage, majority, time_s


def sample_seed(seed, problem, j):
    """The seed of sample j of a problem: the same whatever batch, round or process draws it."""
    return zlib.crc32(f"{seed}/{problem}/{j}".encode()) & 0x7FFFFFFF


def plan_round(todo, fit):
    """A round's (problem, sample) pairs in as few equal batches as fit (one captured graph for all)."""
    if not todo:
        return []
    n_batches = -(-len(todo) // fit)  # ceiling division
    size = -(-len(todo) // n_batches)
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def rank_files(out_dir):
    """Per-process sample files (merged into samples.jsonl at the end; left behind only by a crash)."""
    return sorted(glob.glob(os.path.join(out_dir, "samples.rank*.jsonl")))


def merge_samples(out_dir, keep):
    """samples.jsonl and any per-process files, each (problem, sample) once if keep(sample), written
    back to samples.jsonl atomically (the process files removed)."""
    path, parts = os.path.join(out_dir, "samples.jsonl"), rank_files(out_dir)
    merged = {}
    for f in [path] + parts:
        for s in filter(keep, md.read_jsonl(f, {"problem": int, "sample": int}, lenient=True)):
            merged.setdefault((s["problem"], s["sample"]), s)
    samples = [merged[key] for key in sorted(merged)]
    if os.path.exists(path) or samples:
        md.write_jsonl(samples, path)
    for f in parts:
        os.remove(f)
    return samples


class Group:
    """The processes of a torchrun launch, or just this one; a gloo group, so barriers never wait on a GPU."""

    def __init__(self, env):
        self.rank, self.world = env.rank, env.world
        self.gloo = dist.new_group(backend="gloo") if self.world > 1 else None

    def barrier(self):
        if self.gloo is not None:
            dist.barrier(group=self.gloo)

    def from_rank0(self, obj):
        """rank 0's obj, on every process."""
        box = [obj]
        if self.gloo is not None:
            dist.broadcast_object_list(box, src=0, group=self.gloo)
        return box[0]


@torch.no_grad()
def evaluate(cfg: SampleConfig):
    env = md.setup_env(cfg.device)  # under torchrun: one process per GPU
    try:
        return _evaluate(cfg, env.device, Group(env))
    finally:
        if env.world > 1:
            dist.destroy_process_group()


def _evaluate(cfg, device, group):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = md.read_jsonl(cfg.data)[:cfg.n_problems or None]  # --n_problems 0: all
    name = cfg.name or os.path.basename(os.path.normpath(cfg.checkpoint))
    out_dir = os.path.join(cfg.out_dir, "eval", name)
    model = md.load_model(cfg.checkpoint, device, dtype).eval()
    tokenizer = md.Tokenizer(md.find_tokenizer(cfg.checkpoint))
    md.check_tokenizer_fits(tokenizer, model.cfg, cfg.checkpoint)
    prompts = [md.encode_prompt(tokenizer, r["question"]) for r in rows]
    golds = [md.normalize_number(md.gold_answer(r["answer"])) for r in rows]
    max_new_tokens = cfg.max_new_tokens or md.auto_max_new_tokens(tokenizer, rows)
    prompt_len = max(map(len, prompts))  # every batch is padded to it: a row's numbers never depend on its batch
    max_len = prompt_len + max_new_tokens
    state_dtype = decode_state_dtype(cfg, dtype)
    # what a resumed run must match (a teacher has no SSM state: no state_dtype)
    meta = {"checkpoint": os.path.abspath(cfg.checkpoint), "weights": md.weights_fingerprint(cfg.checkpoint),
            "data": os.path.abspath(cfg.data), "data_file": md.file_fingerprint(cfg.data), "seed": cfg.seed,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k, "max_new_tokens": max_new_tokens,
            "flexible_extract": cfg.flexible_extract, "state_dtype": str(state_dtype) if model.cfg.ssm_layers else None}
    path, meta_path = os.path.join(out_dir, "samples.jsonl"), os.path.join(out_dir, "meta.json")
    error = done = None
    if group.rank == 0:  # settings checked and finished samples gathered once, before any work
        try:
            if (os.path.exists(path) or rank_files(out_dir)) and os.path.exists(meta_path):
                # the defaults: what files written before these two flags existed were drawn with
                old = {"state_dtype": "torch.float32" if model.cfg.ssm_layers else None, "flexible_extract": False,
                       **md.read_json(meta_path)}
                # the files are known by their fingerprints: a moved or copied checkpoint or data file is the same one
                differ = sorted(key for key in meta if key not in ("checkpoint", "data") and old.get(key) != meta[key])
                if differ:
                    raise InputError(f"{meta_path}: earlier samples were drawn with other {', '.join(differ)}"
                                     f"{' (the checkpoint changed since)' if 'weights' in differ else ''}; "
                                     f"use another --name or delete {out_dir}")
            md.write_json(meta_path, meta)
            # keep what an interrupted run wrote, less a torn line and samples this run does not ask for
            kept = merge_samples(out_dir, lambda s: s["problem"] < len(rows) and s["sample"] < cfg.k)
            done = {(s["problem"], s["sample"]) for s in kept}
            if kept:
                print(f"resuming: {len(kept)} samples already in {path}")
        except InputError as e:
            error = str(e)
    # run: rank 0's clock, which tells this run's samples from a resumed run's
    error, done, run = group.from_rank0((error, done, time.time_ns()))
    if error:
        raise InputError(error)
    # each process at its own largest batch, bounded only by the rows its share of a round needs
    fit = cfg.batch_size or largest_batch(model, max_len, dtype, device, 0, cfg.prefill_tokens, state_dtype)
    # round k takes every problem from k/2 samples to k (so time@k is measured); each process every world-th
    todo = {k: [(p, j) for j in range(k // 2, k) for p in range(len(rows)) if (p, j) not in done]
            for k in ks_up_to(cfg.k)}
    plans = {k: plan_round(pairs[group.rank::group.world], fit) for k, pairs in todo.items()}
    sizes = sorted({len(b) for plan in plans.values() for b in plan})
    stop = md.StopRule(model.cfg.vocab_size, tokenizer.stop_ids, tokenizer, device)
    t_setup = time.perf_counter()
    sampler = Sampler(model, max(sizes, default=1), max_len, cfg.temperature, cfg.top_k, cfg.top_p, cfg.cuda_graph,
                      cfg.prefill_tokens, compile=cfg.compile, state_dtype=state_dtype, stop=stop)
    for n in sizes:  # compile and capture every batch size before the clock starts
        sampler.prepare(n)
        if sampler.use_graphs:  # compiling can take minutes: say how far it got
            print(f"{name}: {n}-row decode step ready, {time.perf_counter() - t_setup:.0f}s into set-up", flush=True)
    setup_s = time.perf_counter() - t_setup
    mode = ("compiled, " if sampler.forward is not model else "") + ("CUDA graphs" if sampler.use_graphs else "eager")
    where = f" on {group.world} processes (this is rank {group.rank})" if group.world > 1 else ""
    print(f"{name}: {len(rows)} problems x {cfg.k} samples{where}, up to {fit} rows a batch (batches of {sizes} "
          f"rows), cache {max_len} slots, decode step: {mode} (set up in {setup_s:.1f}s)", flush=True)
    my_path = path if group.world == 1 else os.path.join(out_dir, f"samples.rank{group.rank}.jsonl")
    n_mine = sum(len(b) for plan in plans.values() for b in plan)
    t_start, n_new, n_tokens = time.perf_counter(), 0, 0
    with open(my_path, "a") as fh:
        for k, plan in plans.items():
            group.barrier()  # rounds start together, so a round lasts as long as its slowest process
            for chunk in plan:
                t0 = time.perf_counter()
                outs, stats = sampler.generate([prompts[p] for p, _ in chunk], max_new_tokens, tokenizer=tokenizer,
                                               seeds=[sample_seed(cfg.seed, p, j) for p, j in chunk],
                                               prompt_len=prompt_len)
                share = (time.perf_counter() - t0) / len(chunk)
                for (p, j), ids in zip(chunk, outs):
                    answer = md.extract_answer(md.answer_text(ids, tokenizer), cfg.flexible_extract)
                    fh.write(json.dumps({"problem": p, "sample": j, "text": tokenizer.decode(ids), "answer": answer,
                                         "gold": golds[p], "correct": answer == golds[p], "tokens": len(ids),
                                         "time_s": share, "rank": group.rank, "run": run}) + "\n")
                    n_tokens += len(ids)
                fh.flush()  # a crash loses at most the batch being generated
                n_new += len(chunk)
                el = time.perf_counter() - t_start
                print(f"{'' if group.world == 1 else f'[rank {group.rank}] '}k={k} +{len(chunk)} samples, "
                      f"{n_tokens / el:.0f} new tok/s, {stats['steps']} steps in {stats['decode_s']:.1f}s, "
                      f"ETA {(n_mine - n_new) * el / n_new:.0f}s", flush=True)
    group.barrier()
    if group.rank != 0:
        return None
    samples = merge_samples(out_dir, lambda s: True)
    ks, coverage, majority, time_s = summarize(samples, len(rows), cfg.k)
    # meta's fingerprints and sampling settings, with the checkpoint as given
    summary = {"model": name, **meta, "checkpoint": cfg.checkpoint, "device": md.device_name(device),
               "gpus": group.world, "n_problems": len(rows), "k": ks, "coverage": coverage, "majority": majority,
               "time_s": time_s, "batch_fit": fit, "setup_s": round(setup_s, 2),
               "batch_sizes": {str(k): [len(b) for b in plan] for k, plan in plans.items()},
               "mean_tokens": sum(s["tokens"] for s in samples) / max(len(samples), 1)}
    md.write_json(os.path.join(out_dir, "summary.json"), summary)
    for k, c, m, t in zip(ks, coverage, majority, time_s):
        print(f"k={k:5d} coverage {c:.3f} majority {m:.3f} time {t:.1f}s")
    return summary


# -----------------------------------------------------------------------------
# 3. Speed benchmark: decode tokens/s against batch and generation length, random weights


def step_bytes(model, batch, kv_len, state_dtype):
    """Bytes a decode step must move: every weight once, the KV cache of kv_len tokens, each state twice."""
    w = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = cache_bytes(model, batch, max(kv_len, 1), next(model.parameters()).dtype, state_dtype)
    return w + sum(2 * nbytes if hasattr(blk, "mixer") else nbytes for nbytes, blk in zip(cache, model.model.layers))


def bench_decode(model, batch, prompt_len, gen_len, cfg, state_dtype, points):
    """Tokens/s for gen_len new tokens a row, sampling as HF's default (temperature 1, top-k 50). points = 0:
    one full generate call, after a warm-up call. Else the measured prefill plus the step's graph timed at
    `points` evenly spaced slots: a step's cost is affine in its slot, so the midpoints give the exact mean."""
    sampler = Sampler(model, batch, prompt_len + gen_len, 1.0, 50, 1.0, cfg.cuda_graph, cfg.prefill_tokens,
                      compile=cfg.compile, state_dtype=state_dtype)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    sampler.generate(prompts, 2 if points else 8)  # warm-up: compile, capture
    new = 2 if points else gen_len  # timing steps needs just the measured prefill
    torch.cuda.reset_peak_memory_stats()
    outs, st = sampler.generate(prompts, new, seed=1)
    assert all(len(o) == new for o in outs)
    decode_s = st["decode_s"]
    if points:
        step_s = []
        for i in range(points):
            times = []
            for _ in range(4):
                sampler.seek(prompt_len + int((gen_len - 1) * (i + 0.5) / points), 1)
                t0 = clock(sampler.device)
                sampler.run_step(batch)
                times.append(clock(sampler.device) - t0)
            step_s.append(sorted(times[1:])[1])  # median of 3 after one warm-up replay
        decode_s = (gen_len - 1) * sum(step_s) / points
    return {"tokens_per_s": batch * gen_len / (st["prefill_s"] + decode_s),
            "decode_tokens_per_s": batch * (gen_len - 1) / decode_s, "prefill_s": st["prefill_s"], "decode_s": decode_s,
            "graph_capture_s": sampler.capture_s, "method": f"step times at {points} slots" if points else "generate"}


def bench_hf(shape, batch=256, prompt_len=128, gen_len=512):
    """HF transformers' generate on the same Llama config (sdpa, sampling on), static and default cache."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = md.shape_config(shape).to_dict()
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 128000, (batch, prompt_len), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=gen_len, min_new_tokens=gen_len,
              pad_token_id=0)
    out = []
    for cache, extra in (("static", {"cache_implementation": "static"}), ("dynamic", {})):
        model.generate(ids, **kw, **extra)  # warm-up (the static cache compiles here)
        t0 = clock("cuda")
        model.generate(ids, **kw, **extra)
        out.append({"cache": cache, "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len,
                    "tokens_per_s": batch * gen_len / (clock("cuda") - t0)})
        print(f"HF {cache:8s} cache: {out[-1]['tokens_per_s']:9.0f} tok/s", flush=True)
    return out


def bench(cfg: SampleConfig):
    device = torch.device("cuda")  # main checks there is one: the current GPU
    path = os.path.join(cfg.out_dir, "bench", f"decode_{cfg.bench_shapes.replace(',', '+')}.json")
    if os.path.exists(path):
        raise InputError(f"{path} exists (an earlier benchmark): use another --out_dir, or delete it")
    dtype = torch.bfloat16
    state_dtype = decode_state_dtype(cfg, dtype)
    bw = copy_bandwidth(device)
    result = {"device": md.device_name(device), "copy_GBps": bw, "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "state_dtype": str(state_dtype), "compile": cfg.compile,
              "results": [], "hf": []}
    print(f"{result['device']}: copy bandwidth {bw:.0f} GB/s", flush=True)
    prompt_len = 128
    for shape in cfg.bench_shapes.split(","):
        if cfg.bench_hf and shape == "llama-3.2-1b":
            try:
                result["hf"] = bench_hf(shape)
            except Exception as e:  # an oracle we cannot run must not cost the rest of the bench
                print(f"HF generate failed: {type(e).__name__}: {e}", flush=True)
                result["hf"] = [{"error": f"{type(e).__name__}: {e}"}]
            torch.cuda.empty_cache()  # HF's model is gone: give its memory back
        for kind in cfg.bench_models.split(","):
            with torch.device(device):  # .to(dtype) leaves RoPE frequencies fp32 (LM.inv_freq is no buffer)
                model = md.LM(md.shape_config(shape, kind, cfg.attn_fraction)).to(dtype).eval()
            lens = [int(x) for x in cfg.bench_gen_lens.split(",") if x]
            fit = {n: largest_batch(model, prompt_len + n, dtype, device, cfg.max_batch, cfg.prefill_tokens,
                                    state_dtype) for n in {512, *lens}}  # the largest batch for n new tokens
            batches = [int(x) for x in cfg.bench_batches.split(",") if x]
            # (batch, new tokens) -> points: 0 = a full generate call, else step times at that many slots;
            # first the batch sweep at 512 new tokens, up to the largest batch, then each length at its largest
            runs = {(b, 512): 0 for b in sorted({b for b in batches if b < fit[512]} | {fit[512]})} if batches else {}
            for n in lens:
                runs.setdefault((fit[n], n), 0 if cfg.bench_e2e or not cfg.cuda_graph else 8)
            for (b, n), points in runs.items():
                try:
                    r = bench_decode(model, b, prompt_len, n, cfg, state_dtype, points)
                except torch.OutOfMemoryError:
                    print(f"{shape} {kind} batch {b} gen {n}: out of memory", flush=True)
                else:
                    roof = b / (step_bytes(model, b, prompt_len + n // 2, state_dtype) / (bw * 1e9))  # mean kv length
                    r = {"shape": shape, "model": kind, "batch": b, "prompt_len": prompt_len, "gen_len": n,
                         "tokens_per_s": r.pop("tokens_per_s"), "roofline_tokens_per_s": roof,
                         "roofline_frac": r["decode_tokens_per_s"] / roof,
                         "peak_mem_GB": torch.cuda.max_memory_allocated() / 1e9, **r}
                    result["results"].append(r)
                    md.write_json(path, result)
                    print(f"{shape} {kind:7s} batch {b:5d} gen {n:5d}: {r['tokens_per_s']:9.0f} tok/s "
                          f"(decode {r['decode_tokens_per_s']:9.0f}, {r['roofline_frac']:.0%} of roofline "
                          f"{roof:9.0f}; {r['method']}) peak {r['peak_mem_GB']:.1f} GB", flush=True)
                torch.cuda.empty_cache()
            del model
            torch.cuda.empty_cache()
    ratios = result["ratios"] = {}  # the two ratios results/README.md reports
    hf = result["hf"][0].get("tokens_per_s") if result["hf"] else None  # HF static cache (None: off or failed)
    teacher = {r["shape"]: r["tokens_per_s"] for r in result["results"]  # at 4096 new, the largest batch
               if (r["model"], r["gen_len"]) == ("teacher", 4096)}
    for r in result["results"]:
        if r["model"] == "teacher" and (r["batch"], r["gen_len"]) == (256, 512) and hf:
            ratios[f"{r['shape']} teacher / HF static, batch 256, 512 new"] = r["tokens_per_s"] / hf
        if r["model"] == "pure" and r["gen_len"] == 4096 and r["shape"] in teacher:
            ratios[f"{r['shape']} pure / teacher, 4096 new, largest batches"] = r["tokens_per_s"] / teacher[r["shape"]]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    md.write_json(path, result)
    print(f"wrote {path}")


def main(argv=None):
    cfg = parse_config(SampleConfig, argv, description=__doc__.strip().splitlines()[0])
    if cfg.k & (cfg.k - 1):
        raise InputError(f"--k: expected a power of two, got {cfg.k}")
    if cfg.name and (not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.name) or cfg.name in (".", "..")):
        raise InputError(f"--name {cfg.name!r}: expected a plain name (letters, digits, . _ -) for out_dir/eval/<name>")
    md.check_out_dir(cfg.out_dir)
    cfg = replace(cfg, data=cfg.data or os.path.join(cfg.out_dir, "data", "test.jsonl"))
    if not cfg.bench and not os.path.isfile(cfg.data):
        raise InputError(f"--data {cfg.data}: no such file")
    if cfg.bench:
        for name in ("bench_batches", "bench_gen_lens"):
            value = getattr(cfg, name)
            if not all(x.isdigit() and int(x) > 0 for x in filter(None, value.split(","))):
                raise InputError(f"--{name}: expected positive whole numbers separated by commas, got {value!r}")
        for shape in cfg.bench_shapes.split(","):
            for kind in cfg.bench_models.split(","):
                md.shape_config(shape, kind)  # unknown names fail here, before any work
        if cfg.device == "cpu" or not torch.cuda.is_available():  # an evaluation's setup_env checks --device
            raise InputError("--bench needs a CUDA GPU (--device cuda)")
        return bench(cfg)
    return evaluate(cfg)


if __name__ == "__main__":
    run_cli(main)
