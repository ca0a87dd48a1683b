"""A model of the Hopper prefill kernel's producer/consumer protocol (csrc/cuda/kernels/prefill_sm90.cuh),
to check a change to it for deadlocks and mbarrier parity aliasing before it costs GPU time.

The producer and the consumers (both groups behave alike: one process) run as generators that
yield while a barrier wait blocks; barriers are completion counters. cp.async copies always land,
so only program order and the barriers can block. Each unit is a list of fills (its key tiles,
then its end record), each marked by whether it carries cp.async copies (published L fills later)
or not (published at issue). Configurations: key slots, value slots (equal and released together
for shared stages, main's 64-key shape; separate rings for its 128-key shape), Q buffers, fills in
flight L.

    python3 scripts/sm90_protocol_model.py

It found the Q-buffer hang fixed on 2026-11-26: with two Q buffers, units without key tiles in a
row and Q through cp.async (`fix=False`: ~10 % of random sequences deadlock; with the fix, none).
"""
import random


def run(units, SK, SV, QB, L, split, fix):
    """SK / SV: key / value slots; QB: Q buffers; L: fills in flight; split: a key slot is released
    after S, not with its value slot; fix: the producer publishes unit k - QB's fills before it waits
    for unit k's Q buffer (main since 2026-11-26), instead of assuming them out."""
    cnt, errors = {}, []
    c = lambda b: cnt.get(b, 0)
    def arrive(b): cnt[b] = c(b) + 1
    def ready(b, need):  # the need-th completion (1-based) of barrier b has happened
        if c(b) > need:
            errors.append(f"parity alias on {b}: count {c(b)}, waiting for {need}")
        return c(b) >= need

    def producer():
        st = dict(n=0, pub=0, prev_first=0)
        early = set()
        def publish(m):
            if m in early:
                early.discard(m)
            else:
                arrive(('full', m % SK))
        def begin_fill():
            n = st['n']
            if n - L >= st['pub']:
                publish(st['pub']); st['pub'] += 1
            if n >= SK:
                while not ready(('kempty', n % SK), n // SK): yield
            if n >= SV:
                while not ready(('vempty', n % SV), n // SV): yield
        for k, fills in enumerate(units + [None]):
            if fills is None:  # end of work: a record without copies, then publish everything
                yield from begin_fill()
                early.add(st['n']); arrive(('full', st['n'] % SK))
                while st['pub'] <= st['n']:
                    publish(st['pub']); st['pub'] += 1
                return
            if k >= QB:
                if fix:
                    needed = st['n'] if QB == 1 else st['prev_first']
                else:
                    needed = st['n'] if (QB == 1 or L > 2) else 0
                while st['pub'] < needed:
                    publish(st['pub']); st['pub'] += 1
                while not ready(('qempty', k % QB), k // QB): yield
            st['prev_first'] = st['n']
            for copies in fills:
                yield from begin_fill()
                if not copies:
                    arrive(('full', st['n'] % SK)); early.add(st['n'])
                st['n'] += 1

    def consumer():
        n = 0
        def rk(m):
            if split: arrive(('kempty', m % SK))
        def rv(m):
            arrive(('vempty', m % SV))
            if not split: arrive(('kempty', m % SK))
        for k, fills in enumerate(units + [None]):
            while not ready(('full', n % SK), n // SK + 1): yield
            if fills is None:
                return
            rk(n)  # after the first fill's S (or at once: a unit without key tiles)
            if len(fills) > 1:
                pending = n
                for _ in range(1, len(fills)):
                    n += 1
                    while not ready(('full', n % SK), n // SK + 1): yield
                    rk(n)
                    rv(pending)
                    pending = n
            rv(n)  # the end record's slots
            n += 1
            arrive(('qempty', k % QB))

    alive = [producer(), consumer()]
    while alive:
        before, finished = dict(cnt), False
        for g in list(alive):
            try:
                next(g)
            except StopIteration:
                alive.remove(g); finished = True
        if cnt == before and not finished and alive:
            return "deadlock", errors
    return "ok", errors


def random_units(rng, n_units, p_zero, p_copies, q_cp_async):
    units = []
    for _ in range(n_units):
        tiles = 0 if rng.random() < p_zero else rng.randint(1, 6)
        fills = []
        for i in range(tiles + 1):  # tile fills, then the end record
            first = i == 0
            end = i == tiles
            copies = (first and q_cp_async) or (not end and rng.random() < p_copies)
            fills.append(copies)
        units.append(fills)
    return units


if __name__ == "__main__":
    configs = {
        "main 64-key (4 shared stages, 2 Q)": (4, 4, 2, 2, False),
        "main 128-key (2 + 3 split rings, 2 Q)": (2, 3, 2, 2, True),
        "old 128-key (3 shared stages, 1 Q)": (3, 3, 1, 2, False),
        "split 64-key (4 + 4, 2 Q)": (4, 4, 2, 2, True),
        "split control (3 + 3, 1 Q)": (3, 3, 1, 2, True),
    }
    rng = random.Random(0)
    for fix in (False, True):
        for name, (SK, SV, QB, L, split) in configs.items():
            results = {}
            for trial in range(3000):
                units = random_units(rng, rng.randint(1, 12), rng.choice([0, 0.3, 0.8]), rng.choice([0, 0.2, 1]),
                                     rng.random() < 0.3)
                r, errs = run(units, SK, SV, QB, L, split, fix)
                key = r + (" +alias" if errs else "")
                results[key] = results.get(key, 0) + 1
            print(f"fix={fix!s:5} {name:40} {results}")
