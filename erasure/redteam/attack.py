"""`erasure attack` end to end: check the packs and concepts, load the base, attack each pack alone on it (or the base
itself), and write the records (a JSON file; with ``record``, into each pack directory as a new revision).

Example:
    >>> from erasure.redteam.attack import attack
    >>> records = attack(["packs/circle"], AttackConfig(budget=32), base="toy")
    >>> records["circle"].asr
    {'prompt': 0.02, 'settings': 0.0, 'soft-prompt': 0.05}
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

import torch

from ..base.loading import is_toy_world, load_base
from ..errors import InvalidArgumentError
from ..pack.compose import with_packs
from ..pack.concept_pack import BaseWeights, load_packs, parse_pack_spec
from ..toy.judge import ToyOracleJudge
from .config import AttackConfig
from .judges import Judge
from .record import RedTeamRecord
from .team import RedTeam

# Entry-point group through which a registry lists the attacks its packs have on record (registry/ adds one).
KNOWN_ATTACKS_GROUP = "erasure.known_attacks"


def judge_for(base: str | os.PathLike | None) -> Judge:
    """The judge for ``base``: the toy oracle for the toy world; other bases have no shipped judge yet."""
    if is_toy_world(base):
        return ToyOracleJudge()
    raise InvalidArgumentError(f"no judge for base {base!r}: the red team ships the toy oracle only (a judge for "
                               "real images plugs in as an erasure.redteam.judges.Judge)")


def known_attacks(namespaces: Sequence[str]) -> dict[str, list[str]]:
    """Concept -> the black-box attacks recorded in the packs of these registry namespaces (every tag), through
    the installed registry (the ``erasure.known_attacks`` entry point)."""
    if not namespaces:
        return {}
    sources = list(entry_points(group=KNOWN_ATTACKS_GROUP))
    if not sources:
        raise InvalidArgumentError("--known-from reads a registry: install the registry package (pip install erasure)")
    out: dict[str, list[str]] = {}
    for namespace in namespaces:
        for concept, prompts in sources[0].load()(namespace).items():
            out[concept] = list(dict.fromkeys(out.get(concept, []) + prompts))
    return out


def check_record_targets(specs: Sequence[str], concepts: Sequence[str] | None) -> None:
    """``record`` writes a new revision into pack directories at scale 1, every concept attacked."""
    if not specs:
        raise InvalidArgumentError("--record writes into packs: name the pack directories to attack")
    if concepts:
        raise InvalidArgumentError("--record needs every concept of the pack attacked: drop --concept")
    for spec in specs:
        path, scale = parse_pack_spec(spec)
        if not Path(path).is_dir() or scale != 1.0:
            raise InvalidArgumentError(f"--record writes a new revision into a pack directory at scale 1; "
                                       f"{spec!r} is not one (erasure pull NS/NAME --to DIR first)")


def attack(specs: Sequence[str], cfg: AttackConfig, base: str = "toy", concepts: Sequence[str] | None = None,
           revision: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
           record: bool = False, progress: bool = True) -> dict[str, RedTeamRecord]:
    """Attack each pack of ``specs`` (directories or NS/NAME[@REV], ``PACK[:SCALE]``) alone on ``base`` — or, with no
    packs, the base itself on ``concepts`` — and return the records by pack name. Everything that can be refused is
    refused before the base is loaded; with ``record`` each record is written into its pack directory."""
    # 1. What to attack, and whether the judge can read it.
    if not specs and not concepts:
        raise InvalidArgumentError("name a pack to attack (or --concept C to attack the base itself)")
    if record:
        check_record_targets(specs, concepts)
    judge = judge_for(base)
    for c in concepts or []:
        judge.check(c)
    packs = load_packs(specs)  # refused before the base is loaded if a pack is bad
    for pack, _ in packs:
        for c in pack.concepts:
            judge.check(c)
        missing = sorted(set(concepts or []) - set(pack.concepts))
        if missing:
            raise InvalidArgumentError(f"--concept {', '.join(missing)}: not a concept of pack {pack.name!r} "
                                       f"(it erases {', '.join(pack.concepts)})")

    # 2. Where the searches start: the registry namespaces of the packs named by id, and --known-from.
    ids = [parse_pack_spec(spec)[0] for spec in specs]
    namespaces = [i.split("/")[0] for i in ids if not Path(i).exists() and i.count("/") == 1]
    cfg = cfg.model_copy(update={"known_from": list(dict.fromkeys(cfg.known_from + namespaces))})
    known = known_attacks(cfg.known_from)

    # 3. The base; a pack built for another base is refused before any attack.
    loaded = load_base(base, device, dtype, revision)
    pipe = loaded.pipe
    weights = BaseWeights(loaded.denoiser)
    for pack, _ in packs:
        pack.verify_against(weights)

    # 4. The attacks: the base itself, or each pack composed alone onto it.
    records: dict[str, RedTeamRecord] = {}
    if not packs:
        team = RedTeam(pipe, judge, cfg.model_copy(update={"calibrate": False}), loaded.defaults, progress)
        t0 = time.perf_counter()
        team = team.starting_from_records(known, concepts)
        records["(base)"] = team.record(team.attack_pipe(pipe, concepts), time.perf_counter() - t0)
        return records
    team = RedTeam(pipe, judge, cfg, loaded.defaults, progress)
    for pack, scale in packs:
        if cfg.guide_away is not None:  # attacked (and, with record, published) as served with it
            pack.manifest.guide_away = cfg.guide_away
        t0 = time.perf_counter()
        pack_team = team.for_pack(pack).starting_from_records(known, concepts or pack.concepts)
        erased = with_packs(pipe, [(pack, scale)], base=weights)
        results = pack_team.attack_pipe(erased, concepts or pack.concepts)
        found = pack_team.record(results, time.perf_counter() - t0)
        found.config = found.config.model_copy(update={"guide_away": pack.guide_away})
        records[pack.name if pack.name not in records else str(pack.path)] = found

    # 5. With record, each pack directory gets its record (a new revision to push).
    if record:
        for (pack, _), found in zip(packs, records.values()):
            pack.manifest.redteam = found
            pack.save_pretrained(pack.path)
    return records


def export_attacker(cfg: AttackConfig | None = None, device: str = "cpu", progress: bool = True):
    """What `erasure export --attack` gives ``export_pack``: for a pack, a function that red-teams the export written
    in a directory as plain diffusers runs it (a LoRA loaded with ``load_lora_weights``, or the merged pipeline),
    against the pack's base for the base's rates. ``cfg``: the attack (default: the one of the pack's own record,
    so the figures compare; without a record, AttackConfig's defaults)."""
    def for_pack(pack):
        ref = pack.manifest.base
        judge = judge_for(ref.id)  # before anything is written: a base without a judge cannot be measured
        config = cfg or (pack.manifest.redteam.config if pack.manifest.redteam else AttackConfig())
        config = config.model_copy(update={"guide_away": 0.0})  # what the export carries

        def measure(directory: Path, kind: str) -> RedTeamRecord:
            from diffusers import DiffusionPipeline

            base = load_base(ref.id, device, revision=ref.revision)
            if kind == "lora":
                exported = load_base(ref.id, device, revision=ref.revision).pipe
                exported.load_lora_weights(str(directory))
            else:
                exported = DiffusionPipeline.from_pretrained(str(directory)).to(device)
            exported.set_progress_bar_config(disable=True)
            team = RedTeam(base.pipe, judge, config, base.defaults, progress)
            t0 = time.perf_counter()
            return team.record(team.attack_pipe(exported, pack.concepts), time.perf_counter() - t0)

        return measure

    return for_pack
