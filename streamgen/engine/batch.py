"""Running the chunk programs of several sessions together (the execution half of a step; which
sessions run together is the scheduler's choice).

A chunk program (``SessionState.chunk_program``, wrapped by the engine) is a generator that yields
the model calls it needs next (``sampling.stream.ModelCall``: x, t, cache, absolute start frame,
commit or not) and is sent their outputs. ``run_programs`` advances every program to its next
calls, groups the pending calls of all sessions by shape (``ModelCall.key``: chunk frames, latent
size, dtypes), runs each group as one ``WanModel.forward_rows`` (each row on its own cache slot, at
its own position, with its own valid length) and sends the outputs back, until every program has
returned. Sessions in step (same chunk shape, the usual case) share every forward; one that is not
(an image start's one-frame pass) joins a group of the same shape where there is one and runs alone
where there is none. A prompt switch's re-cache (one forward over the whole window, ``ModelCall.blocks``)
always runs alone.

A program that raises gets its exception as its result; the others go on. A batched forward that
raises is retried call by call, so one session's bad call fails that session only (nothing is
committed to any cache before a forward completes, and the retried calls rewrite the same slots).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from streamgen.sampling.stream import ModelCall, Program

__all__ = ["run_programs", "forward_calls", "Interrupted"]


def forward_calls(model, calls: list[ModelCall]) -> list[torch.Tensor]:
    """Outputs of ``calls`` (same key, distinct caches) from one forward. A call with ``blocks`` (the
    one-forward re-cache, whose key is its own) runs alone as ``forward_chunk(..., blocks=...)``."""
    if len(calls) == 1 or any(c.blocks is not None for c in calls):
        return [c.run(model) for c in calls]
    x = torch.cat([c.x for c in calls])  # (B, 16, f, h, w)
    t = torch.cat([c.t.reshape(-1).expand(c.cache.batch) for c in calls])  # (B,)
    y = model.forward_rows(x, t, [c.cache for c in calls], start_frames=[c.start for c in calls],
                           update_cache=[c.update_cache for c in calls])
    return list(torch.split(y, [c.cache.batch for c in calls]))


class Interrupted(Exception):
    """The result of a program that ``run_programs`` stopped early (its ``interrupt`` said so)."""


def run_programs(model, programs: dict[Hashable, Program], stats: dict | None = None,
                 interrupt: Callable[[Hashable], bool] | None = None) -> dict[Hashable, object]:
    """Run ``programs`` to the end together; returns {key: result or the exception it raised}.
    ``stats`` (optional) counts ``forwards`` and ``rows``. ``interrupt(key)``, asked before each
    round of forwards for every program whose next calls commit nothing (``update_cache`` False:
    the denoising steps, which change no cache), stops that program there: it is closed and its
    result is an ``Interrupted`` (a prompt change abandons the old prompt's chunk in progress)."""
    results: dict[Hashable, object] = {}
    pending: dict[Hashable, list[ModelCall]] = {}

    def advance(k, value) -> None:
        try:
            pending[k] = programs[k].send(value)
        except StopIteration as stop:
            pending.pop(k, None)
            results[k] = stop.value
        except Exception as e:  # noqa: BLE001 - this session's failure, reported to it alone
            pending.pop(k, None)
            results[k] = e

    for k in programs:
        advance(k, None)
    while pending:
        if interrupt is not None:
            for k in [k for k, calls in pending.items() if not any(c.update_cache for c in calls) and interrupt(k)]:
                pending.pop(k)
                programs[k].close()
                results[k] = Interrupted()
        groups: dict[tuple, list[tuple[Hashable, int, ModelCall]]] = {}
        for k, calls in pending.items():
            for j, c in enumerate(calls):
                groups.setdefault(c.key(), []).append((k, j, c))
        outs = {k: [None] * len(calls) for k, calls in pending.items()}
        failed: dict[Hashable, BaseException] = {}
        for members in groups.values():
            try:
                ys = forward_calls(model, [c for _, _, c in members])
                n = 1
            except Exception as e:  # noqa: BLE001
                if len(members) == 1:
                    failed[members[0][0]] = e
                    continue
                ys, n = [], len(members)
                for k, _, c in members:  # one by one: only the faulty call's session fails
                    try:
                        ys += forward_calls(model, [c])
                    except Exception as e1:  # noqa: BLE001
                        failed.setdefault(k, e1)
                        ys.append(None)
            if stats is not None:
                stats["forwards"] = stats.get("forwards", 0) + n
                stats["rows"] = stats.get("rows", 0) + sum(c.cache.batch for _, _, c in members)
            for (k, j, _), y in zip(members, ys):
                outs[k][j] = y
        for k in list(pending):
            if k in failed:
                pending.pop(k)
                programs[k].close()
                results[k] = failed[k]
            else:
                advance(k, outs[k])
    return results
