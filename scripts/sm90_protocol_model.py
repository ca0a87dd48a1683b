"""A model of the Hopper prefill kernel's producer/consumer protocol (csrc/cuda/kernels/prefill_sm90.cuh),
to check a change to it for deadlocks, mbarrier parity aliasing and unbalanced turns before it costs
GPU time.

The producer and the two consumer groups run as generators that yield while a barrier wait blocks;
barriers are counters. cp.async copies always land, so only program order and the barriers can
block. Each unit is a list of fills, each marked by whether it carries cp.async copies (published L
fills later) or not (published at issue), and whether it ends in an end record (a fill without
values after its key tiles; a unit without key tiles is one) or in a marked last tile fill
(kFillLast: the consumers issue that fill's P.V on its own and then release its slots; the one-warp
producer's 64-key fills, sm90_marks_last_fill; units without key tiles still send their end record.
The 64-key configurations mix both endings, which covers the four-warp kernels' end records too).
Configurations: key
slots, value slots (equal and released together for shared stages, main's 64-key shape; separate
rings for its 128-key shape), Q buffers, fills in flight L, turns.

The empties (key, value, Q) complete on both groups' arrivals (the kernel counts 2 x 128 threads):
an arrival of one group for a phase the other has not finished would complete that phase early.
Turns (sm90_turns; 128-key fills, both shapes with BSA_SM90_TURNS=2): the groups issue their
products (the peeled first S of a unit with key tiles; each further fill's S and previous P.V, the
end record's included) alternately through named barriers T0 and T1. Group g's begin_turn is a
bar.sync on Tg, its end_turn a bar.arrive on T(1-g); the k-th completion of Tg pairs group g's k-th
sync with the other group's k-th arrival. Group 1 arrives on T0 once before its first unit (group 0
goes first); at the end record without a unit group 0 syncs on T0 once more to take group 1's last
hand-over.

Checks: deadlock (no process can move; the waits are monotone, so the verdict holds for every
interleaving); parity alias (a barrier passes the phase a waiter wants); overwrite (the producer
writes a slot whose previous fill the consumers have not released); phase mix (above); turn
overrun (a second arrival on Tg before group g synced: the hardware does not queue arrivals, they
would complete the barrier by themselves); a dangling turn arrival at the end. All but the first
depend on the interleaving: each trial runs the processes in a random order, preempted at random.

    python3 scripts/sm90_protocol_model.py

It found the Q-buffer hang fixed on 2026-11-26: with two Q buffers, units without key tiles in a
row and Q through cp.async (`fix=False`: ~10 % of random sequences deadlock; with the fix, none).
The self-tests at the end break the protocol on purpose (the turns, a value slot's wait) and check
that the model notices. (Q buffers freed a unit late, an experiment measured no faster and removed
on 2026-12-05, needed the producer to publish one fill more: the model found that hang too.)
"""
import random


def run(units, SK, SV, QB, L, split, fix, turns=False, mutant=None, sched=None, vfull=False, pairs=False):
    """units: (fills, marked) pairs, marked for a unit whose last fill is marked (no end record);
    SK / SV: key / value slots; QB: Q buffers; L: fills in flight; split: a key slot is released
    after S, not with its value slot; fix: the producer publishes unit k - QB's fills before it waits
    for unit k's Q buffer (main since 2026-11-26), instead of assuming them out; turns: the consumer
    groups issue their products in turns; mutant: 'no bootstrap' (group 1 never hands group 0 its
    first turn), 'no final sync' (group 0 never takes group 1's last hand-over), 'no value wait' (a
    fill does not wait for its value slot), 'no end-record value arrival' (value barriers: the producer
    skips an end record's arrival) or 'no marked release' (the consumers keep a marked last
    fill's value slot, as if an end record were still to come), for the self-test;
    sched: a random.Random for the order the processes run in and for preemption (None: fixed order,
    each process runs until it blocks); vfull: value barriers (BSA_SM90_VALUE_BARRIERS), one arrival
    a fill on its value slot's full barrier (end records included), which a consumer waits for before
    the fill's P.V.; pairs: two producers (BSA_SM90_PAGED_PAIRS, 128-key fills over TMA pages) issue the
    even and the odd fills, each publishing its own cp.async fills at the top of its next fill (two
    fills later) and the fills before a Q buffer's reuse, both meeting at every unit's claim; mutant
    'pairs publish late' has each pair publish its copies a fill of its own later (four fills), and
    'pairs both wait for Q' has both pairs wait for a unit's Q buffer, not only the one that loads its
    Q (the other may then look for a phase that has passed twice), for the self-test."""
    cnt, errors = {}, []
    preempted = [False]
    c = lambda b: cnt.get(b, 0)
    def arrive(b, g=None):
        cnt[b] = c(b) + 1
        if g is not None:  # a consumer group's arrival on a barrier that both groups complete
            cnt[b, g] = c((b, g)) + 1
            if c((b, g)) > c((b, 1 - g)) + 1:
                errors.append(f"phase mix on {b}: group {g} at {c((b, g))} arrivals, the other at {c((b, 1 - g))}")
    def ready(b, need, per=1):  # the need-th completion (1-based, `per` arrivals each) of barrier b has happened
        if c(b) // per > need:
            errors.append(f"parity alias on {b}: {c(b) // per} completions, waiting for {need}")
        return c(b) >= per * need
    def wait(done):  # yields while done() is false (with sched, now and then also when it is true)
        while True:
            if done():
                if sched is None or sched.random() >= 0.2:
                    return
                preempted[0] = True  # could go on: let the others run first
            yield

    def producer(pair=0):
        step = 2 if pairs else 1  # a pair issues and publishes every other fill
        lag = (4 if mutant == 'pairs publish late' else 2) if pairs else L
        st = dict(n=0, pub=pair if pairs else 0, firsts=[])  # firsts: each unit's first fill
        early = set()
        owns = lambda m: not pairs or m % 2 == pair
        def publish(m):
            if m in early:
                early.discard(m)
            else:
                arrive(('full', m % SK))
        def released(kind, slots, m):  # the consumers have released the slot's fill before fill m
            return m < slots or c((kind, m % slots)) >= 2 * (m // slots)
        def write(kind, slots, m):
            if not released(kind, slots, m):
                errors.append(f"overwrite on {kind}: fill {m}'s slot before the consumers released it")
        def begin_fill():
            n = st['n']
            if n - lag >= st['pub']:
                publish(st['pub']); st['pub'] += step
            if n >= SK:
                yield from wait(lambda: ready(('kempty', n % SK), n // SK, 2))
            if n >= SV and mutant != 'no value wait':
                yield from wait(lambda: ready(('vempty', n % SV), n // SV, 2))
            write('kempty' if split else 'vempty', SK if split else SV, n)
        for k, unit in enumerate(units + [None]):
            if pairs:  # the unit's claim: both pairs meet (a named barrier of all producer threads)
                arrive(('claim', k))
                yield from wait(lambda: c(('claim', k)) >= 2)
            if unit is None:  # end of work: a record without copies, then publish everything
                if owns(st['n']):
                    yield from begin_fill()
                    early.add(st['n']); arrive(('full', st['n'] % SK))
                    if vfull: arrive(('vfull', st['n'] % SV))
                while st['pub'] <= st['n']:
                    publish(st['pub']); st['pub'] += step
                return
            if k >= QB:
                if fix:
                    needed = st['n'] if QB == 1 else st['firsts'][k - QB + 1]  # unit k - QB's fills
                else:
                    needed = st['n'] if (QB == 1 or L > 2) else 0
                while st['pub'] < needed:
                    publish(st['pub']); st['pub'] += step
                if owns(st['n']) or mutant == 'pairs both wait for Q':  # the pair that loads the unit's Q
                    yield from wait(lambda: ready(('qempty', k % QB), k // QB, 2))
            fills, marked = unit
            st['firsts'].append(st['n'])
            for i, copies in enumerate(fills):
                n = st['n']
                if not owns(n):  # the other pair's fill: walked, not issued
                    st['n'] += 1
                    continue
                yield from begin_fill()
                if marked or i < len(fills) - 1:  # a tile fill's values (an end record has none)
                    write('vempty', SV, n)
                if not copies:
                    arrive(('full', n % SK)); early.add(n)
                end_record = not (marked or i < len(fills) - 1)
                if vfull and not (end_record and mutant == 'no end-record value arrival'):
                    arrive(('vfull', n % SV))  # the values' own barrier: every fill
                st['n'] += 1

    def begin_turn(g):  # bar.sync on Tg: completes with the other group's matching arrival
        arrive(('sync', g))
        k = c(('sync', g))
        yield from wait(lambda: c(('turn', g)) >= k)  # arrivals past k are the next generation's: no alias
    def end_turn(g):  # bar.arrive on T(1-g): does not block
        o = 1 - g
        if c(('turn', o)) > c(('sync', o)):
            errors.append(f"turn overrun on T{o}: group {g} arrives again before group {o} synced")
        arrive(('turn', o))

    def consumer(g):
        n = 0
        def rk(m):
            if split: arrive(('kempty', m % SK), g)
        def rv(m):
            arrive(('vempty', m % SV), g)
            if not split: arrive(('kempty', m % SK), g)
        def turn(pv=None):  # begin_turn, issue the products (P.V of fill pv), end_turn
            if turns:
                yield from begin_turn(g)
            if vfull and pv is not None:  # the values of fill pv, waited for inside the turn
                yield from wait(lambda: ready(('vfull', pv % SV), pv // SV + 1))
            if turns:
                end_turn(g)
        if turns and g == 1 and mutant != 'no bootstrap':
            end_turn(1)  # group 0 goes first
        for k, unit in enumerate(units + [None]):
            yield from wait(lambda: ready(('full', n % SK), n // SK + 1))
            if unit is None:
                if turns and g == 0 and mutant != 'no final sync':
                    yield from begin_turn(0)  # group 1's last hand-over
                return
            fills, marked = unit
            tiles = len(fills) if marked else len(fills) - 1
            if tiles:
                yield from turn()  # the peeled first S
            rk(n)  # after the first fill's S (or at once: a unit without key tiles)
            if tiles:
                pending = n
                for _ in range(1, len(fills)):  # the further tile fills, then the end record if any
                    n += 1
                    yield from wait(lambda: ready(('full', n % SK), n // SK + 1))
                    yield from turn(pending)  # S of fill n, P.V of fill n - 1
                    rk(n)
                    yield from wait(lambda: True)  # the softmax: P.V n - 1 completes after S n
                    rv(pending)
                    pending = n
                if marked:
                    yield from turn(pending)  # the last fill's P.V on its own
            if not (marked and mutant == 'no marked release'):
                rv(n)  # the end record's slots, or the marked last fill's value slot
            n += 1
            arrive(('qempty', k % QB), g)

    alive = ([producer(0), producer(1)] if pairs else [producer()]) + [consumer(0), consumer(1)]
    while alive:
        before, finished, preempted[0] = dict(cnt), False, False
        for p in (sched.sample(alive, len(alive)) if sched else list(alive)):
            try:
                next(p)
            except StopIteration:
                alive.remove(p); finished = True
        if cnt == before and not finished and not preempted[0] and alive:
            return "deadlock", sorted(set(errors))
    for g in (0, 1):  # every hand-over taken
        if c(('turn', g)) != c(('sync', g)):
            errors.append(f"dangling turn arrival on T{g}: {c(('turn', g))} arrivals, {c(('sync', g))} syncs")
    return "ok", sorted(set(errors))


def random_units(rng, n_units, p_zero, p_copies, q_cp_async, p_marked):
    """p_marked: the chance that a unit with key tiles ends in a marked last fill."""
    units = []
    for _ in range(n_units):
        tiles = 0 if rng.random() < p_zero else rng.randint(1, 6)
        marked = tiles > 0 and rng.random() < p_marked
        fills = []
        for i in range(tiles if marked else tiles + 1):  # tile fills, then the end record if any
            first = i == 0
            end = i == tiles
            copies = (first and q_cp_async) or (not end and rng.random() < p_copies)  # Q or a tile through cp.async
            fills.append(copies)
        units.append((fills, marked))
    return units


def outcome(result):  # "ok", "deadlock", plus the kinds of error seen
    r, errs = result
    return r + "".join(sorted({f" +{e.split(' on ')[0]}" for e in errs}))


if __name__ == "__main__":
    # SK, SV, QB, L, split, turns, and the share of units with key tiles whose last fill is marked
    # (64-key fills: the one-warp producer marks it, the four-warp ones do not).
    configs = {
        "main 64-key (4 shared stages, 3 Q)": (4, 4, 3, 2, False, False, 0.5),
        "64-key, 2 Q (BSA_SM90_Q_BUFFERS=2)": (4, 4, 2, 2, False, False, 0.5),
        "main 128-key (2 + 3 split rings, 2 Q)": (2, 3, 2, 2, True, False, 0),
        "main 128-key, turns": (2, 3, 2, 2, True, True, 0),
        "128-key, turns, value barriers": (2, 3, 2, 2, True, True, 0),
        "64-key, turns (BSA_SM90_TURNS=2)": (4, 4, 2, 2, False, True, 0.5),
        "old 128-key (3 shared stages, 1 Q)": (3, 3, 1, 2, False, False, 0),
        "split 64-key (4 + 4, 2 Q)": (4, 4, 2, 2, True, False, 0.5),
        "split control (3 + 3, 1 Q)": (3, 3, 1, 2, True, False, 0),
        "main 128-key, turns, paged pairs": (2, 3, 2, 2, True, True, 0),
    }
    trials = 2000
    def sample(p_marked):
        rng = random.Random(0)
        return [random_units(rng, rng.randint(1, 12), rng.choice([0, 0.3, 0.8]), rng.choice([0, 0.2, 1]),
                             rng.random() < 0.3, p_marked) for _ in range(trials)]
    samples = {p: sample(p) for p in {config[-1] for config in configs.values()}}
    def tally(name, fix=True, mutant=None, trials=None):
        """Outcome counts of a configuration over the samples (the first `trials` of them)."""
        SK, SV, QB, L, split, turns, p_marked = configs[name]
        results = {}
        vfull = "value barriers" in name
        pairs = "pairs" in name
        for trial, units in enumerate(samples[p_marked][:trials]):
            key = outcome(run(units, SK, SV, QB, L, split, fix, turns, mutant, random.Random(trial), vfull, pairs))
            results[key] = results.get(key, 0) + 1
        return results

    for fix in (False, True):
        for name in configs:
            print(f"fix={fix!s:5} {name:40} {tally(name, fix)}")

    # Self-test: a broken turn protocol must show. Without group 1's first hand-over group 0 never gets
    # a turn (nor its final sync); without group 0's final sync group 1's last hand-over dangles.
    for mutant, expect in (("no bootstrap", "deadlock"), ("no final sync", "ok +dangling turn arrival")):
        for name in ("main 128-key, turns", "64-key, turns (BSA_SM90_TURNS=2)"):
            results = tally(name, mutant=mutant, trials=300)
            print(f"self-test {mutant:17} {name:40} {results}")
            assert results == {expect: 300}, f"the model misses a broken turn protocol ({mutant})"
    # ... and a fill that does not wait for its value slot (split rings: the key slot's wait does not
    # cover it) must overwrite values in use: the overwrite check's own test.
    name = "main 128-key (2 + 3 split rings, 2 Q)"
    results = tally(name, mutant="no value wait", trials=300)
    print(f"self-test no value wait     {name:40} {results}")
    assert any("overwrite" in key for key in results), "the model misses an overwritten value slot"
    # ... and with value barriers, a producer that skips an end record's arrival on its value slot
    # leaves the slot's phases behind the fills: a later P.V waits for a phase that never completes.
    name = "128-key, turns, value barriers"
    results = tally(name, mutant="no end-record value arrival", trials=300)
    print(f"self-test no end-record value arrival {name:30} {results}")
    assert "deadlock" in results, "the model misses value barriers' phases out of step"
    # ... and consumers that keep a marked last fill's slots (as they would if they waited for an end
    # record) must hang the ring once it wraps.
    name = "main 64-key (4 shared stages, 3 Q)"
    results = tally(name, mutant="no marked release", trials=300)
    print(f"self-test no marked release {name:40} {results}")
    assert "deadlock" in results, "the model misses a marked last fill's slots never released"
    # ... and warp pairs that publish their cp.async fills a fill of their own too late (four fills
    # back: the key slot's next fill waits for an S that waits for that publication) must hang.
    name = "main 128-key, turns, paged pairs"
    results = tally(name, mutant="pairs publish late", trials=300)
    print(f"self-test pairs publish late {name:39} {results}")
    assert "deadlock" in results, "the model misses warp pairs publishing their copies too late"
    results = tally(name, mutant="pairs both wait for Q", trials=2000)
    print(f"self-test pairs both wait for Q {name:36} {results}")
    assert any("parity alias" in key for key in results), "the model misses a pair waiting for a Q buffer it does not load"
