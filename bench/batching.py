"""The cross-session batching gain of the generator, its figure type and table, and the library
level: `BlockSampler.run([r1..rB])` against B calls of `run([ri])`, no service in between.
The service level (through the proxy and through handles) is `bench.service_batching`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.stats import rate, table


@dataclass
class BatchFigure:
    """Blocks per second of B sessions batched against the one-at-a-time baseline `how`."""

    level: str  # "library" or "service"
    config: str
    batch: int
    how: str  # what the one-at-a-time baseline is
    batched_blocks_s: float
    single_blocks_s: float

    @property
    def ratio(self) -> float:
        return self.batched_blocks_s / self.single_blocks_s


def library_batching(config: str, batch: int, repeats: int, threads: int) -> BatchFigure:
    """`BlockSampler.run([r1..rB])` against B calls of `run([ri])`: same-shape streaming blocks
    (after the warm start: 2 context + 10 new frames, a full cache), nfe 10, `threads` torch threads."""
    import torch

    from avatar_forcing.config import preset
    from avatar_forcing.engine.motion_stream import MotionStream, StreamOptions
    from avatar_forcing.nn.flow_transformer import FlowTransformer
    from avatar_forcing.sampling.block_sampler import BlockSampler

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            sampler = BlockSampler(FlowTransformer(preset(config).flow).eval())
            dim, block = sampler.model.config.motion_dim, sampler.model.config.block
            # One warm-started stream (its first window at nfe 2: the cache's shape does not depend
            # on it), copied B times; each copy gets its own conditions for its next block.
            base = MotionStream(sampler, torch.randn(dim) * 0.3, StreamOptions(warm_start=True, nfe=2), seed=0)
            blob = base.to_bytes()
            requests = []
            for i in range(batch):
                stream = MotionStream.from_bytes(sampler, blob)
                stream.push(*(torch.randn(block, dim) for _ in range(3)))
                request = stream.next_request(nfe=10)
                request.noise = torch.randn(request.noise.shape, generator=torch.Generator().manual_seed(i))
                requests.append(request)
        keys = {r.batch_key() for r in requests}
        assert len(keys) == 1, keys  # one shape: one forward pass per step for all of them
        sampler.run(requests)  # warm-up
        sampler.run(requests[:1])
        batched, single = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            sampler.run(requests)
            batched.append(time.perf_counter() - start)
            start = time.perf_counter()
            for request in requests:
                sampler.run([request])
            single.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return BatchFigure(
        "library",
        config,
        batch,
        f"{batch} x run([ri]), {threads} thread(s), best of {repeats}",
        batch / min(batched),
        batch / min(single),
    )


def batching_table(figures: list[BatchFigure]) -> str:
    """One row per figure: level, config, B, the baseline, both rates and their ratio."""
    rows = [
        [f.level, f.config, f.batch, f.how, rate(f.batched_blocks_s), rate(f.single_blocks_s), f"{f.ratio:.2f}x"]
        for f in figures
    ]
    return table(
        ["level", "config", "B", "one-at-a-time baseline", "batched blocks/s", "one-at-a-time blocks/s", "gain"],
        rows,
        "llrlrrr",
    )
