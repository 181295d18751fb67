"""Kernel profiles (kernel_model/kernels.py): complete for every registered code key, selected
by [scenario] kernel, --kernel and kernel= under [config], the variant and --set; a variant no
profile has is counterfactual, and validate, --json and reports say so."""

from __future__ import annotations

import json

import pytest

import ptsim
from ptsim.cli import main
from ptsim.kernel_model import kernels
from ptsim.kernel_model.registry import CONFIG
from ptsim.scenario import ScenarioError, loads_scenario

from conftest import SCENARIOS

D2 = str(SCENARIOS / "d02_nonempty_reclaim_after_break.toml")
D6 = str(SCENARIOS / "d06_collapse_vs_reclaim_vma_lock.toml")

TEXT = """
[scenario]
name = "k"
{kernel}
cpus = 2

[config]
{config}

[[vma]]
start = 0x7f0000000000
size = "2M"

[[agent]]
cpu = 0
op = "madvise_dontneed"
addr = 0x7f0000000000
len = "2M"

[[variant]]
name = "v"
config = {{ {variant} }}
"""


def scenario(kernel: str = "", config: str = "", variant: str = ""):
    line = f'kernel = "{kernel}"' if kernel else ""
    return loads_scenario(TEXT.format(kernel=line, config=config, variant=variant), "k.toml")


def ptsim_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_profile_sets_every_registered_code_key():
    assert {"6.12", "6.14", "6.17", "mainline"} <= set(kernels.KERNELS)
    assert kernels.missing_values() == {}
    for profile in kernels.KERNELS.values():
        for key, value in profile.config().items():
            assert value in CONFIG[key].values, (profile.name, key, value)
            assert profile.values[key].source, (profile.name, key)


def test_completeness_check_sees_a_key_registered_later(monkeypatch):
    from ptsim.kernel_model.registry import ConfigKey

    monkeypatch.setitem(CONFIG._entries, "late_key",
                        ConfigKey("late_key", (True, False), "doc", "", "tests"))
    assert set(kernels.missing_values()) == set(kernels.KERNELS)


def test_profiles_differ_where_the_kernels_did():
    v612, v614, v617, main_ = (kernels.KERNELS[n] for n in ("6.12", "6.14", "6.17", "mainline"))
    assert (v612.value("pt_reclaim"), v614.value("pt_reclaim")) == (False, True)
    assert (v612.value("table_free"), v614.value("table_free")) == ("page", "rcu")
    assert (v614.value("madv_dontneed_lock"), v617.value("madv_dontneed_lock")) == ("mmap", "vma")
    assert (v614.value("collapse_lock_vma_first"), v617.value("collapse_lock_vma_first")) == (
        False, True)
    assert (v614.value("pmd_flush_freed_tables"), v617.value("pmd_flush_freed_tables")) == (
        False, True)
    assert (v617.value("pt_reclaim_code"), main_.value("pt_reclaim_code")) == (
        "try_to_free_pte", "zap_empty_pte_table")


def test_no_kernel_named_is_the_registry_defaults():
    scn = scenario().resolve("v")
    assert scn.kernel is None
    assert dict(scn.config) == {k.name: k.default for k in CONFIG.values()}


def test_precedence_profile_config_variant_set():
    sf = scenario("6.14", config='table_free = "semi_rcu"\nmadv_dontneed_lock = "vma"',
                  variant='table_free = "page"')
    scn = sf.resolve("v", ["madv_dontneed_lock=mmap"])
    cfg = dict(scn.config)
    assert cfg["pt_reclaim"] is True and cfg["collapse_lock_vma_first"] is False  # profile
    assert cfg["table_free"] == "page"  # the variant over [config]
    assert cfg["madv_dontneed_lock"] == "mmap"  # --set over [config]
    # --kernel replaces the file's profile, still under [config] and the variant
    cfg = dict(sf.resolve("v", ["kernel=6.12"]).config)
    assert cfg["pt_reclaim"] is False and cfg["ptlock_free"] == "immediate"
    assert cfg["table_free"] == "page" and cfg["madv_dontneed_lock"] == "vma"


def test_the_profile_is_part_of_the_digest():
    sf = scenario("6.17")
    assert sf.resolve("v").digest() != scenario().resolve("v").digest()
    assert sf.resolve("v", ["kernel=mainline"]).kernel == "mainline"


def test_unknown_kernel_in_the_file_is_one_line():
    with pytest.raises(ScenarioError) as err:
        scenario("5.4")
    message = str(err.value)
    assert message == ('k.toml: scenario.kernel: unknown kernel "5.4" '
                       '(known: 6.12, 6.14, 6.17, mainline)')


@pytest.mark.parametrize("command", [["run"], ["stress", "--runs", "1"], ["explore"]])
def test_unknown_kernel_option_exits_2_with_one_line(capsys, command):
    code, out, err = ptsim_cli(capsys, command[0], D2, *command[1:], "--variant",
                               "rescan-after-break", "--kernel", "2.6")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert '--kernel 2.6: unknown kernel "2.6" (known: 6.12, 6.14, 6.17, mainline)' in err
    assert D2 in err


def test_api_kernel_keyword():
    sc = ptsim.load(D2)
    v = sc.variant("rescan-after-break", kernel="6.17")
    assert v.kernel == "6.17" and dict(v.resolved.config)["madv_dontneed_lock"] == "vma"
    assert sc.variant("rescan-after-break").kernel == "6.14"  # the file's
    with pytest.raises(ScenarioError, match="unknown kernel"):
        sc.variant("rescan-after-break", kernel="nope")


def test_counterfactual_needs_a_code_key_off_every_profile():
    assert scenario("6.14").resolve("v").counterfactual == []
    # environment keys never make a variant counterfactual
    assert scenario("6.14", variant='split_ptlocks = false, tlb_flush = "broadcast"').resolve(
        "v").counterfactual == []
    # a release's other configuration (6.14 with CONFIG_PT_RECLAIM=n) is faithful
    assert scenario("6.14", variant='pt_reclaim = false, table_free = "page"').resolve(
        "v").counterfactual == []
    # ... but not PT_RECLAIM with tlb_remove_page (D10), nor an unmerged RFC (D9)
    why = scenario("6.14", variant='table_free = "page"').resolve("v").counterfactual
    assert why == ['table_free = "page" (6.14 has "rcu")']
    why = scenario("mainline", variant="flush_before_set_pmd = true").resolve("v").counterfactual
    assert len(why) == 1 and why[0].startswith("flush_before_set_pmd = true (never released")
    # a variant matching another profile than its own is faithful (6.17 with 6.14's lock)
    assert scenario("6.17", variant='madv_dontneed_lock = "mmap", collapse_lock_vma_first = '
                    'false, pmd_flush_freed_tables = false').resolve("v").counterfactual == []


def test_validate_warns_on_a_counterfactual_catalogue_variant_only(capsys):
    code, out, err = ptsim_cli(capsys, "validate", D2, D6)
    assert code == 0 and "ok " in out
    lines = err.splitlines()
    assert lines == [
        f"ptsim: warning: {D2}: variant before-fix: counterfactual, it matches no kernel "
        "profile (kernel 6.14): zap_rescan_after_break = false (never released: the 6.14 "
        "release candidates only)",
        f"ptsim: warning: {D6}: variant check-before-vma-lock: counterfactual, it matches no "
        "kernel profile (kernel 6.17): collapse_lock_vma_first = false (6.17 has true)",
    ]  # rescan-after-break (6.14) and vma-lock-first (6.17) are faithful: no line


def test_validate_kernel_option_changes_the_verdict(capsys):
    code, _out, err = ptsim_cli(capsys, "validate", "--kernel", "6.12", D6)
    assert code == 0
    # 6.12 has no per-VMA MADV_DONTNEED: the file's "vma" makes both variants counterfactual
    assert err.count("counterfactual") == 2 and 'madv_dontneed_lock = "vma"' in err


def test_list_kernels_json(capsys):
    code, out, _ = ptsim_cli(capsys, "list", "kernels", "--json")
    assert code == 0
    rows = json.loads(out)
    by_name = {r["name"]: r for r in rows}
    assert {"6.12", "6.14", "6.17", "mainline"} <= set(by_name)
    for row in rows:
        assert row["doc"] and row["tree"]
        assert set(row["config"]) == set(CONFIG) == set(row["sources"])
    assert by_name["6.12"]["config"]["pt_reclaim"] is False
    assert by_name["mainline"]["config"]["pt_reclaim_code"] == "zap_empty_pte_table"
    code, out, _ = ptsim_cli(capsys, "list", "kernels")
    assert code == 0 and "mainline" in out and "6.12" in out


def test_run_json_and_report_say_counterfactual(capsys):
    code, out, _ = ptsim_cli(capsys, "run", D2, "--variant", "rescan-after-break", "--json",
                             "--seed", "0")
    data = json.loads(out)
    assert data["kernel"] == "6.14" and "counterfactual" not in data
    d1 = str(SCENARIOS / "d01_semi_rcu_single_free.toml")
    code, out, _ = ptsim_cli(capsys, "run", d1, "--variant", "semi-rcu", "--seed", "2",
                             "--strategy", "pct", "--no-shrink")
    assert code == 1
    assert ("Kernel: 6.17, counterfactual: this configuration matches no kernel profile "
            '(table_free = "semi_rcu" (6.17 has "rcu"))') in out


def test_kernel_travels_in_the_token(capsys):
    v = ptsim.load(str(SCENARIOS / "d01_semi_rcu_single_free.toml")).variant(
        "semi-rcu", kernel="6.17")
    r = v.run(seed=2, strategy="pct")
    assert r.bug is not None
    assert v.replay(r.token).bug.kind == r.bug.kind
    code, out, err = ptsim_cli(capsys, "replay", str(SCENARIOS / "d01_semi_rcu_single_free.toml"),
                               r.token)
    assert code == 1, err
