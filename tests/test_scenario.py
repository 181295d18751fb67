"""Scenario files: parsing, validation messages, resolve precedence, --set and digests."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import re
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptsim import scenario as sc
from ptsim.kernel_model.registry import CONFIG, FAULTS, OPS, bug_kinds, hazard_kinds
from ptsim.scenario import ScenarioError, load_scenario, parse_scenario, parse_set

BASE = 0x7F0000000000
M = 1 << 20

FULL = """
[scenario]
name = "semi-RCU single-table free vs an rcu_read_lock walker"
description = "Why PT_RECLAIM needs full RCU table freeing."
cpus = 3
max_steps = 20000

[config]
pt_reclaim = true
table_free = "semi_rcu"

[faults]
table_batch_alloc_fail = 1

[[vma]]
start = 0x7f0000000000
size = "4M"
populate = true

[[vma]]                       # touches the first one: ranges may span both
start = 0x7f0000400000
size = 2097152
type = "shmem"
file = "f0"
thp = true
pgoff = 16

[[vma]]
start = 0x10000000
size = "1G"
mm = "mm1"
uffd_wp = true

[[setup]]
op = "touch"
addr = 0x7f0000000000
len = "16K"
write = true

[[agent]]
cpu = 0
op = "madvise_dontneed"
addr = 0x7f0000000000
len = "6M"

[[agent]]
cpu = 1
repeat = 3
stride = "2M"
do = [ { op = "touch", addr = 0x7f0000000000, len = "2M" },
       { op = "gup_fast", addr = 0x7f0000000000, nr_pages = 4, write = true } ]

[[agent]]
cpu = 2
op = "lazy_tlb"

[[agent]]
cpu = 2
mm = "mm1"
op = "uffd_move"
addr = 0x10000000
dst = 0x10200000

[[agent]]
cpu = 2
op = "mremap_move_pmd"
addr = 0x7f0000000000
dst = 0x7f0000400000

[[variant]]
name = "semi-rcu"
config = { table_free = "semi_rcu", tlb_flush = "broadcast" }
faults = { need_resched = 0.25 }
expect = ["pt-use-after-free", "mixed-tlb-sizes"]

[[variant]]
name = "full-rcu"
config = { table_free = "rcu" }
expect = []

[expect]
runs = 2000
strategy = "pct"
"""

HEAD = '[scenario]\nname = "t"\ncpus = 2\n'
VMA = '[[vma]]\nstart = 0x7f0000000000\nsize = "4M"\n'
AGENT = '[[agent]]\ncpu = 0\nop = "touch"\naddr = 0x7f0000000000\n'


def doc(*, head: str = HEAD, vma: str = VMA, agent: str = AGENT, extra: str = "") -> str:
    return "\n".join((head, vma, agent, extra))


def write(tmp_path, text: str, name: str = "x.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path, text: str) -> tuple[str, str]:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return str(path), str(info.value)


def assert_one_line(message: str, file: str, where: str) -> str:
    """The message is '<file>: <where>: <what>' on one line; returns <what>."""
    assert "\n" not in message and "\r" not in message
    prefix = f"{file}: {where}: "
    assert message.startswith(prefix), message
    assert "Traceback" not in message and "internal error" not in message
    return message[len(prefix) :]


# -------------------------------------------------------------------------------------------
# A full valid file
# -------------------------------------------------------------------------------------------


def test_full_file_parses_with_values_and_defaults(tmp_path):
    f = load_scenario(write(tmp_path, FULL))
    assert f.path == str(tmp_path / "x.toml")
    assert f.name.startswith("semi-RCU") and f.description.startswith("Why")
    assert (f.cpus, f.max_steps) == (3, 20000)
    assert f.config == (("pt_reclaim", True), ("table_free", "semi_rcu"))
    assert f.faults == (("table_batch_alloc_fail", 1.0),)
    assert isinstance(dict(f.faults)["table_batch_alloc_fail"], float)

    v0, v1, v2 = f.vmas
    assert (v0.start, v0.size, v0.end) == (BASE, 4 * M, BASE + 4 * M)
    assert (v0.type, v0.populate, v0.thp, v0.mm, v0.file, v0.uffd_wp, v0.pgoff) == (
        "anon", True, False, "mm0", None, False, 0
    )
    assert (v1.type, v1.file, v1.thp, v1.pgoff, v1.size) == ("shmem", "f0", True, 16, 2 * M)
    assert (v2.mm, v2.size, v2.uffd_wp) == ("mm1", 1 << 30, True)

    (setup,) = f.setup
    assert (setup.cpu, setup.repeat, setup.stride, setup.mm, setup.key) == (0, 1, 0, "mm0",
                                                                            "setup[0]")
    assert setup.ops[0].args == (("addr", BASE), ("len", 16384), ("write", True))

    a0, a1, a2, a3, a4 = f.agents
    assert a0.key == "agent[0]" and a0.ops[0].op == "madvise_dontneed"
    assert a0.ops[0].params == {"addr": BASE, "len": 6 * M}
    assert (a1.cpu, a1.repeat, a1.stride) == (1, 3, 2 * M)
    touch, gup = a1.ops
    assert touch.args == (("addr", BASE), ("len", 2 * M),
                          ("write", False))  # write defaults to false
    assert gup.get("nr_pages") == 4 and gup.get("write") is True
    assert a2.ops[0].args == (("steps", 100),)
    assert a3.mm == "mm1" and a3.ops[0].params == {"addr": 0x10000000, "dst": 0x10200000,
                                                   "len": 4096}
    assert a4.ops[0].get("dst") == BASE + 4 * M
    with pytest.raises(KeyError):
        a4.ops[0].get("len")
    assert a4.ops[0].get("len", None) is None

    assert f.variant_names() == ["semi-rcu", "full-rcu"]
    assert f.variants[0].config == (("table_free", "semi_rcu"), ("tlb_flush", "broadcast"))
    assert f.variants[0].faults == (("need_resched", 0.25),)
    assert f.variants[0].expect == ("pt-use-after-free", "mixed-tlb-sizes")
    assert (f.expect.runs, f.expect.strategy, f.expect.depth, f.expect.kinds) == (2000, "pct", 3,
                                                                                  ())


def test_minimal_file_gets_defaults(tmp_path):
    f = load_scenario(write(tmp_path, doc()))
    assert (f.description, f.max_steps, f.config, f.faults, f.setup, f.variants) == ("", 100000,
                                                                                     (), (), (), ())
    assert f.expect == sc.Expect(runs=1000, strategy="pct", depth=3, kinds=())
    assert f.agents[0].ops[0].args == (("addr", BASE), ("len", 4096), ("write", False))
    assert f.variant_names() == ["base"]
    s = f.resolve()
    assert s.cfg == sc.config_defaults() and s.flt == {"table_batch_alloc_fail": 0.0,
                                                       "need_resched": 0.0,
                                                       "mmu_gather_batch_full": 0.0}
    assert [k for k, _ in s.config] == list(CONFIG)
    assert [k for k, _ in s.faults] == list(FAULTS)
    assert s.variant is None and s.overrides == () and s.expect_kinds == ()
    assert f.resolve("base").variant == "base"
    assert f.resolve("base").digest() == s.digest()


def test_vocabulary_tables_match_spec():
    defaults = sc.config_defaults()
    assert defaults["table_free"] == "rcu" and defaults["flush_before_set_pmd"] is False
    assert CONFIG["flush_before_set_pmd"].values == (False, True)
    assert CONFIG["madv_dontneed_lock"].values == ("vma", "mmap")
    # Part 1's 14, then pmd_flush_freed_tables, pte_mapped_thp_recheck_always, pt_reclaim_code,
    # ptlock_kind
    assert len(CONFIG) == 18
    length = OPS["madvise_dontneed"].param("len")
    assert (length.type, length.required) == ("size", True)
    nr_pages = OPS["gup_fast"].param("nr_pages")
    assert (nr_pages.type, nr_pages.default) == ("int", 1)
    assert "livelock" in bug_kinds() and set(hazard_kinds()) == {"mixed-tlb-sizes",
                                                                 "tlb-divergence"}


@pytest.mark.parametrize(
    "size, expected",
    [('"4K"', 4096), ('"16k"', 16384), ('"2M"', 2 * M), ('"50G"', 50 << 30), ('"8192"', 8192),
     ("12288", 12288)],
)
def test_size_spellings(tmp_path, size, expected):
    f = load_scenario(write(tmp_path, doc(vma=f'[[vma]]\nstart = 0x7f0000000000\nsize = {size}\n')))
    assert f.vmas[0].size == expected


def test_kinds_in_expect_for_a_variantless_file(tmp_path):
    f = load_scenario(write(tmp_path, doc(extra='[expect]\nkinds = ["leak", "tlb-divergence"]\n')))
    assert f.expect.kinds == ("leak", "tlb-divergence")
    assert f.resolve().expect_kinds == ("leak", "tlb-divergence")
    assert f.resolve("base").expect_kinds == ("leak", "tlb-divergence")


def test_ranges_may_span_touching_vmas_and_stride_stays_inside(tmp_path):
    vmas = VMA + '[[vma]]\nstart = 0x7f0000400000\nsize = "2M"\n'
    agent = ('[[agent]]\ncpu = 1\nrepeat = 3\nstride = "2M"\nop = "munmap"\n'
             'addr = 0x7f0000000000\nlen = "2M"\n')
    f = load_scenario(write(tmp_path, doc(vma=vmas, agent=agent)))
    assert f.agents[0].repeat == 3


def test_huge_repeat_is_checked_quickly(tmp_path):
    agent = '[[agent]]\ncpu = 0\nrepeat = 1000000000\nop = "touch"\naddr = 0x7f0000000000\n'
    assert load_scenario(write(tmp_path, doc(agent=agent))).agents[0].repeat == 10**9


# -------------------------------------------------------------------------------------------
# resolve(): file < variant < --set
# -------------------------------------------------------------------------------------------


def test_resolve_precedence(tmp_path):
    f = load_scenario(write(tmp_path, FULL))

    plain = f.resolve()
    assert plain.variant is None and plain.expect_kinds == ()
    assert plain.cfg["table_free"] == "semi_rcu" and plain.cfg["tlb_flush"] == "ipi"
    assert plain.flt == {"table_batch_alloc_fail": 1.0, "need_resched": 0.0,
                         "mmu_gather_batch_full": 0.0}

    v = f.resolve("semi-rcu")
    assert v.variant == "semi-rcu" and v.expect_kinds == ("pt-use-after-free", "mixed-tlb-sizes")
    assert v.cfg["tlb_flush"] == "broadcast" and v.cfg["pt_reclaim"] is True  # file value kept
    assert v.flt == {"table_batch_alloc_fail": 1.0, "need_resched": 0.25,
                     "mmu_gather_batch_full": 0.0}

    o = f.resolve("semi-rcu", ["tlb_flush=ipi", "faults.need_resched=1", "table_free=page",
                               "table_free=rcu"])
    assert o.cfg["tlb_flush"] == "ipi" and o.cfg["table_free"] == "rcu"  # the last --set wins
    assert o.flt["need_resched"] == 1.0 and isinstance(o.flt["need_resched"], float)
    assert o.overrides == ("tlb_flush=ipi", "faults.need_resched=1", "table_free=page",
                           "table_free=rcu")
    assert f.resolve("full-rcu").cfg["table_free"] == "rcu"
    assert f.resolve("full-rcu").expect_kinds == ()


def test_resolve_checks_overrides_and_variants(tmp_path):
    f = load_scenario(write(tmp_path, FULL))
    path = str(tmp_path / "x.toml")
    for variant in ("nope", "base"):  # a file with variants has no implicit "base"
        with pytest.raises(ScenarioError) as info:
            f.resolve(variant)
        assert str(info.value) == (f"{path}: --variant {variant}: no such variant "
                                   "(have: semi-rcu, full-rcu)")
    with pytest.raises(ScenarioError) as info:
        f.resolve(None, ["table_free=fast"])
    what = assert_one_line(str(info.value), path, "--set table_free=fast")
    assert '"rcu", "semi_rcu", "page"' in what


def test_unknown_variant_on_variantless_file(tmp_path):
    f = load_scenario(write(tmp_path, doc()))
    with pytest.raises(ScenarioError, match=r"--variant fixed: no such variant \(have: base\)$"):
        f.resolve("fixed")


# -------------------------------------------------------------------------------------------
# --set
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item, expected",
    [
        ("table_free=rcu", ("config", "table_free", "rcu")),
        ('table_free="semi_rcu"', ("config", "table_free", "semi_rcu")),
        ("table_free = page", ("config", "table_free", "page")),
        ("faults.table_batch_alloc_fail=1.0", ("faults", "table_batch_alloc_fail", 1.0)),
        ("faults.need_resched=0", ("faults", "need_resched", 0.0)),
        ("pt_reclaim=false", ("config", "pt_reclaim", False)),
        ("config.flush_before_set_pmd=true", ("config", "flush_before_set_pmd", True)),
    ],
)
def test_parse_set(item, expected):
    got = parse_set(item)
    assert got == expected
    assert type(got[2]) is type(expected[2])


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("table_free", "expected KEY=VALUE"),
        ("=rcu", "expected KEY=VALUE"),
        ("tablefree=rcu", 'unknown config key "tablefree"'),
        ("faults.oom=0.5", 'unknown fault key "oom"'),
        ("vma.size=4", "unknown key"),
        ("table_free=fast", 'expected one of "rcu", "semi_rcu", "page", got string "fast"'),
        ("pt_reclaim=1", "expected one of true, false, got integer 1"),
        ("pt_reclaim=yes", 'got string "yes"'),
        ("faults.need_resched=1.5", "expected a probability in 0..1, got 1.5"),
        ("faults.need_resched=nan", "expected a probability in 0..1"),
        ("faults.need_resched=true", "got boolean true"),
    ],
)
def test_parse_set_rejects(item, fragment):
    with pytest.raises(ScenarioError) as info:
        parse_set(item)
    message = str(info.value)
    assert message.startswith(f"--set {item}: ") and fragment in message and "\n" not in message


# -------------------------------------------------------------------------------------------
# digest
# -------------------------------------------------------------------------------------------


def test_digest_is_stable_and_sensitive(tmp_path):
    a = load_scenario(write(tmp_path, FULL, "a.toml")).resolve("semi-rcu")
    b = load_scenario(write(tmp_path, FULL, "b.toml")).resolve("semi-rcu")
    assert a.canonical() == b.canonical() and a.digest() == b.digest()
    assert re.fullmatch(r"[0-9a-f]{16}", a.digest())

    # Names, descriptions, variant names and the way a value was reached do not count.
    renamed = FULL.replace('name = "semi-rcu"', 'name = "buggy"').replace("Why PT", "How PT")
    c = load_scenario(write(tmp_path, renamed, "c.toml")).resolve("buggy")
    assert c.digest() == a.digest()
    assert a.digest() == load_scenario(write(tmp_path, FULL, "d.toml")).resolve(
        "full-rcu", ["table_free=semi_rcu", "tlb_flush=broadcast", "faults.need_resched=0.25"]
    ).digest()

    # Any semantic change does.
    changed = [
        FULL.replace("cpus = 3", "cpus = 4"),
        FULL.replace("max_steps = 20000", "max_steps = 20001"),
        FULL.replace('len = "6M"', 'len = "4M"'),
        FULL.replace("nr_pages = 4", "nr_pages = 5"),
        FULL.replace('size = "1G"', 'size = "2G"'),
        FULL.replace("pgoff = 16", "pgoff = 17"),
        FULL.replace("repeat = 3", "repeat = 2"),
        FULL.replace('len = "16K"', 'len = "12K"'),
    ]
    digests = {a.digest()}
    for i, text in enumerate(changed):
        assert text != FULL
        digests.add(load_scenario(write(tmp_path, text, f"e{i}.toml")).resolve("semi-rcu").digest())
    page = tuple((k, "page" if k == "table_free" else v) for k, v in a.config)
    digests.add(dataclasses.replace(a, config=page).digest())
    digests.add(load_scenario(write(tmp_path, FULL, "f.toml"))
                .resolve("semi-rcu", ["faults.need_resched=0.5"]).digest())
    assert len(digests) == len(changed) + 3


def test_digest_does_not_depend_on_key_order(tmp_path):
    one = doc(extra='[config]\ntable_free = "page"\npt_reclaim = false\n')
    two = doc(extra='[config]\npt_reclaim = false\ntable_free = "page"\n')
    agent_reordered = '[[agent]]\naddr = 0x7f0000000000\nop = "touch"\ncpu = 0\n'
    a = load_scenario(write(tmp_path, one, "a.toml")).resolve()
    b = load_scenario(write(tmp_path, two.replace(AGENT, agent_reordered), "b.toml")).resolve()
    assert a.canonical() == b.canonical()


# -------------------------------------------------------------------------------------------
# Bad input: one line, file name, key path (or line/column)
# -------------------------------------------------------------------------------------------


def test_toml_syntax_error_gives_line_and_column(tmp_path):
    file, message = error_of(tmp_path, '[scenario]\nname = "t"\ncpus = = 2\n')
    what = assert_one_line(message, file, "line 3, column 8")
    assert "(at line" not in what and what


def test_toml_error_at_end_of_document(tmp_path):
    file, message = error_of(tmp_path, "[scenario]\nname = [1,\n")
    assert_one_line(message, file, "line 3, column 1")


def test_unreadable_files(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ScenarioError, match=r"missing\.toml: cannot read: "):
        load_scenario(missing)
    with pytest.raises(ScenarioError, match=r": cannot read: "):
        load_scenario(tmp_path)  # a directory
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe[scenario]")
    with pytest.raises(ScenarioError, match=r"bin\.toml: cannot read: not UTF-8"):
        load_scenario(binary)


OUTSIDE = "is outside every VMA of mm0"

BAD_CASES = [
    # (id, text, key path, fragment of what is wrong)
    ("unknown-top-level", doc(extra="[bogus]\nx = 1\n"), "bogus", "unknown key at top level"),
    ("agent-array-not-table", "agent = { cpu = 0 }\n" + HEAD + VMA, "agent",
     "expected an array of tables"),
    ("unknown-key-scenario", doc(head=HEAD + "cpu = 2\n"), "scenario.cpu", "unknown key"),
    ("unknown-key-agent", doc(agent=AGENT + "adr = 0x7f0000000000\n"), "agent[0].adr",
     'unknown key for op "touch"'),
    ("unknown-key-vma", doc(vma=VMA + "prot = 3\n"), "vma[0].prot", "unknown key"),
    (
        "unknown-key-do-item",
        doc(agent='[[agent]]\ncpu = 0\n'
                  'do = [{ op = "fault", addr = 0x7f0000000000, len = "4K" }]\n'),
        "agent[0].do[0].len",
        'unknown key for op "fault"',
    ),
    (
        "op-param-on-do-entry",
        doc(agent='[[agent]]\ncpu = 0\naddr = 0x7f0000000000\n'
                  'do = [{ op = "fault", addr = 0x7f0000000000 }]\n'),
        "agent[0].addr",
        "inside each do item",
    ),
    ("unknown-key-variant", doc(extra='[[variant]]\nname = "a"\nexpects = []\n'),
     "variant[0].expects", "unknown key"),
    ("unknown-key-expect", doc(extra="[expect]\nseeds = 4\n"), "expect.seeds", "unknown key"),
    ("unknown-config-key", doc(extra="[config]\npt_reclaimm = true\n"), "config.pt_reclaimm",
     "unknown key"),
    ("unknown-fault-key", doc(extra="[faults]\noom = 0.1\n"), "faults.oom", "unknown key"),
    ("cpus-string", doc(head='[scenario]\nname = "t"\ncpus = "two"\n'), "scenario.cpus",
     'expected an integer in 1..64, got string "two"'),
    ("cpus-float", doc(head='[scenario]\nname = "t"\ncpus = 2.0\n'), "scenario.cpus",
     "got float 2.0"),
    ("cpus-bool", doc(head='[scenario]\nname = "t"\ncpus = true\n'), "scenario.cpus",
     "got boolean true"),
    ("repeat-bool", doc(agent=AGENT + "repeat = true\n"), "agent[0].repeat", "got boolean true"),
    ("nr-pages-bool",
     doc(agent='[[agent]]\ncpu = 0\nop = "gup_fast"\naddr = 0x7f0000000000\nnr_pages = false\n'),
     "agent[0].nr_pages", "got boolean false"),
    ("write-int", doc(agent=AGENT + "write = 1\n"), "agent[0].write",
     "expected true or false, got integer 1"),
    ("populate-string", doc(vma=VMA + 'populate = "yes"\n'), "vma[0].populate", 'got string "yes"'),
    ("missing-scenario", VMA + AGENT, "scenario", "missing required table"),
    ("missing-name", doc(head="[scenario]\ncpus = 2\n"), "scenario.name", "missing required key"),
    ("missing-agent-cpu", doc(agent='[[agent]]\nop = "touch"\naddr = 0x7f0000000000\n'),
     "agent[0].cpu", "missing"),
    ("missing-op-param", doc(agent='[[agent]]\ncpu = 0\nop = "munmap"\naddr = 0x7f0000000000\n'),
     "agent[0].len", 'missing required key for op "munmap"'),
    ("missing-op", doc(agent="[[agent]]\ncpu = 0\n"), "agent[0]", "missing op"),
    ("op-and-do", doc(agent=AGENT + 'do = [{ op = "fault", addr = 0x7f0000000000 }]\n'), "agent[0]",
     "not both"),
    ("empty-do", doc(agent="[[agent]]\ncpu = 0\ndo = []\n"), "agent[0].do", "non-empty array"),
    ("no-agents", doc(agent=""), "agent", "at least one [[agent]]"),
    ("cpus-zero", doc(head='[scenario]\nname = "t"\ncpus = 0\n'), "scenario.cpus",
     "expected an integer in 1..64, got 0"),
    ("max-steps-zero", doc(head=HEAD + "max_steps = 0\n"), "scenario.max_steps",
     "expected an integer >= 1, got 0"),
    ("probability-1.5", doc(extra="[faults]\nneed_resched = 1.5\n"), "faults.need_resched",
     "in 0..1, got 1.5"),
    ("probability-negative", doc(extra="[faults]\ntable_batch_alloc_fail = -1\n"),
     "faults.table_batch_alloc_fail", "in 0..1"),
    ("probability-string", doc(extra='[faults]\nneed_resched = "0.5"\n'), "faults.need_resched",
     "got string"),
    ("runs-zero", doc(extra="[expect]\nruns = 0\n"), "expect.runs", ">= 1"),
    ("unknown-strategy", doc(extra='[expect]\nstrategy = "dfs"\n'), "expect.strategy",
     '"random", "pct"'),
    ("cpu-beyond-cpus", doc(agent=AGENT.replace("cpu = 0", "cpu = 3")), "agent[0].cpu",
     "cpu 3 is beyond cpus = 2 (CPUs are 0..1)"),
    ("setup-cpu-beyond-cpus",
     doc(extra='[[setup]]\ncpu = 2\nop = "fault"\naddr = 0x7f0000000000\n'), "setup[0].cpu",
     "cpu 2 is beyond cpus = 2"),
    ("negative-cpu", doc(agent=AGENT.replace("cpu = 0", "cpu = -1")), "agent[0].cpu", ">= 0"),
    ("overlapping-vmas", doc(vma=VMA + '[[vma]]\nstart = 0x7f0000200000\nsize = "4M"\n'), "vma[1]",
     "overlaps vma[0]"),
    ("overlapping-vmas-reversed", doc(vma='[[vma]]\nstart = 0x7f0000200000\nsize = "4M"\n' + VMA),
     "vma[1]", "overlaps vma[0]"),
    ("unknown-mm", doc(agent=AGENT + 'mm = "mm1"\n'), "agent[0].mm", 'no VMA belongs to mm "mm1"'),
    ("addr-before-vma", doc(agent=AGENT.replace("0x7f0000000000", "0x7effffff0000")),
     "agent[0].addr", f"address 0x7effffff0000 {OUTSIDE}"),
    ("len-past-vma",
     doc(agent='[[agent]]\ncpu = 0\nop = "pte_walker"\naddr = 0x7f0000000000\nlen = "8M"\n'),
     "agent[0].addr", f"address 0x7f0000400000 {OUTSIDE}"),
    (
        "gap-between-vmas",
        doc(
            vma=VMA + '[[vma]]\nstart = 0x7f0000600000\nsize = "2M"\n',
            agent='[[agent]]\ncpu = 0\nop = "madvise_dontneed"\naddr = 0x7f0000000000\n'
                  'len = "8M"\n',
        ),
        "agent[0].addr",
        f"address 0x7f0000400000 {OUTSIDE}",
    ),
    (
        "repeat-stride-past-end",
        doc(agent='[[agent]]\ncpu = 0\nrepeat = 3\nstride = "2M"\n'
                  'do = [{ op = "touch", addr = 0x7f0000000000, len = "2M" }]\n'),
        "agent[0].do[0].addr",
        f"address 0x7f0000400000 {OUTSIDE} (range 0x7f0000400000..0x7f0000600000, "
        "repetition 2 of 3",
    ),
    ("gup-pages-past-end",
     doc(agent='[[agent]]\ncpu = 0\nop = "gup_fast"\naddr = 0x7f00003ff000\nnr_pages = 2\n'),
     "agent[0].addr", OUTSIDE),
    ("dst-outside",
     doc(agent='[[agent]]\ncpu = 0\nop = "uffd_move"\naddr = 0x7f0000000000\n'
               'dst = 0x7f0000400000\n'), "agent[0].dst", OUTSIDE),
    ("other-mm", doc(vma=VMA + '[[vma]]\nstart = 0x10000000\nsize = "4M"\nmm = "mm1"\n',
                     agent=AGENT + 'mm = "mm1"\n'), "agent[0].addr", "is outside every VMA of mm1"),
    ("mremap-unaligned",
     doc(agent='[[agent]]\ncpu = 0\nop = "mremap_move_pmd"\naddr = 0x7f0000001000\n'
               'dst = 0x7f0000200000\n'), "agent[0].addr", "not 2M aligned"),
    ("unaligned-addr", doc(agent=AGENT.replace("0x7f0000000000", "0x7f0000000800")),
     "agent[0].addr", "not page aligned"),
    ("unaligned-vma-start", doc(vma='[[vma]]\nstart = 0x7f0000000010\nsize = "4M"\n'),
     "vma[0].start", "not page aligned"),
    ("unaligned-size", doc(vma='[[vma]]\nstart = 0x7f0000000000\nsize = 6000\n'), "vma[0].size",
     "not page aligned"),
    ("unaligned-len", doc(agent=AGENT + 'len = "1K"\n'), "agent[0].len", "not page aligned"),
    ("unaligned-stride", doc(agent=AGENT + "stride = 100\nrepeat = 2\n"), "agent[0].stride",
     "not page aligned"),
    ("zero-size", doc(vma='[[vma]]\nstart = 0x7f0000000000\nsize = 0\n'), "vma[0].size",
     "expected a size > 0"),
    ("bad-size-unit", doc(vma='[[vma]]\nstart = 0x7f0000000000\nsize = "4T"\n'), "vma[0].size",
     'got string "4T"'),
    ("addr-as-string", doc(agent=AGENT.replace("0x7f0000000000", '"0x7f0000000000"')),
     "agent[0].addr", "expected an integer address"),
    ("addr-kernel-space", doc(agent=AGENT.replace("0x7f0000000000", "0xffff888000000000")),
     "agent[0].addr", "outside user space"),
    ("vma-past-user-space", doc(vma='[[vma]]\nstart = 0x7ffffff00000\nsize = "2M"\n'),
     "vma[0].size", "past the end of user space"),
    ("file-vma-without-file", doc(vma=VMA + 'type = "file"\n'), "vma[0].file", "needs file"),
    ("anon-vma-with-file", doc(vma=VMA + 'file = "f0"\n'), "vma[0].file",
     "not allowed on an anon VMA"),
    ("unknown-vma-type", doc(vma=VMA + 'type = "device"\n'), "vma[0].type",
     '"anon", "file", "shmem"'),
    ("unknown-op", doc(agent=AGENT.replace('"touch"', '"tuoch"')), "agent[0].op",
     'unknown op "tuoch" (registered: fault, '),
    ("op-not-string", doc(agent=AGENT.replace('"touch"', "3")), "agent[0].op", "got integer 3"),
    ("unknown-config-value", doc(extra='[config]\ntable_free = "fast"\n'), "config.table_free",
     'expected one of "rcu", "semi_rcu", "page", got string "fast"'),
    ("config-bool-as-int", doc(extra="[config]\npt_reclaim = 1\n"), "config.pt_reclaim",
     "expected one of true, false, got integer 1"),
    ("variant-config-value",
     doc(extra='[[variant]]\nname = "a"\nconfig = { tlb_flush = "invlpgb" }\n'),
     "variant[0].config.tlb_flush", '"ipi", "broadcast"'),
    ("variant-fault-value", doc(extra='[[variant]]\nname = "a"\nfaults = { need_resched = 2 }\n'),
     "variant[0].faults.need_resched", "in 0..1"),
    ("variant-missing-name", doc(extra="[[variant]]\nexpect = []\n"), "variant[0].name", "missing"),
    ("variant-duplicate-name", doc(extra='[[variant]]\nname = "a"\n[[variant]]\nname = "a"\n'),
     "variant[1].name", 'duplicate variant name "a" (also variant[0])'),
    ("expect-kinds-with-variants", doc(extra='[[variant]]\nname = "a"\n[expect]\nkinds = []\n'),
     "expect.kinds", "without [[variant]]"),
    ("unknown-kind-in-variant", doc(extra='[[variant]]\nname = "a"\nexpect = ["leak", "pt-uaf"]\n'),
     "variant[0].expect[1]", 'unknown kind "pt-uaf" (known: '),
    ("unknown-kind-in-expect", doc(extra='[expect]\nkinds = ["use-after-free"]\n'),
     "expect.kinds[0]", "unknown kind"),
    ("expect-not-list", doc(extra='[[variant]]\nname = "a"\nexpect = "leak"\n'),
     "variant[0].expect", "expected an array of kinds"),
    ("quoted-key", doc(agent=AGENT + '"bad key" = 1\n'), 'agent[0]."bad key"', "unknown key"),
    ("newline-in-value", doc(head='[scenario]\nname = "t"\ncpus = """two\nthree"""\n'),
     "scenario.cpus", 'got string "two\\nthree"'),
]


@pytest.mark.parametrize("text, where, fragment", [c[1:] for c in BAD_CASES],
                         ids=[c[0] for c in BAD_CASES])
def test_bad_input(tmp_path, text, where, fragment):
    tomllib.loads(text)  # the case is valid TOML: the error must come from our checks
    file, message = error_of(tmp_path, text)
    what = assert_one_line(message, file, where)
    assert fragment in what, message


# -------------------------------------------------------------------------------------------
# Robustness: any wrongly typed value anywhere gives a ScenarioError, never another exception
# -------------------------------------------------------------------------------------------

WRONG_VALUES = ["two", True, 1.5, -4096, 2**70, [], [1], {}, {"x": 1}, datetime.date(2024, 1, 1)]


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaf_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaf_paths(value, prefix + (i,))
    yield prefix


def _replace(tree, path, value):
    tree = copy.deepcopy(tree)
    if not path:
        return value
    node = tree
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return tree


def test_every_value_replaced_by_a_wrong_type_is_reported():
    data = tomllib.loads(FULL)
    for path in _leaf_paths(data):
        for wrong in WRONG_VALUES:
            try:
                parse_scenario(_replace(data, path, wrong), "f.toml")
            except ScenarioError as err:
                message = str(err)
                assert message.startswith("f.toml: ") and "\n" not in message, (path, wrong,
                                                                                 message)
                assert "internal error" not in message, (path, wrong, message)


# -------------------------------------------------------------------------------------------
# The range check against a brute-force model
# -------------------------------------------------------------------------------------------


@st.composite
def _layouts(draw):
    pages = sorted(draw(st.sets(st.integers(0, 40), max_size=8)))
    spans = []  # runs of consecutive covered pages -> merged spans, in bytes
    for page in pages:
        if spans and spans[-1][1] == page * 4096:
            spans[-1] = (spans[-1][0], (page + 1) * 4096)
        else:
            spans.append((page * 4096, (page + 1) * 4096))
    start = draw(st.integers(0, 40)) * 4096
    length = draw(st.integers(1, 6)) * 4096
    repeat = draw(st.integers(1, 12))
    stride = draw(st.integers(0, 5)) * 4096
    return spans, start, length, repeat, stride


@settings(max_examples=300, deadline=None)
@given(_layouts())
def test_first_uncovered_matches_brute_force(layout):
    spans, start, length, repeat, stride = layout
    covered = {addr for lo, hi in spans for addr in range(lo, hi, 4096)}
    expected = None
    for r in range(repeat):
        lo = start + r * stride
        missing = [a for a in range(lo, lo + length, 4096) if a not in covered]
        if missing:
            expected = (r, missing[0])
            break
    assert sc._first_uncovered(spans, start, length, repeat, stride) == expected
