"""MKGSG: knowledge-grounded multiple-choice questions with ontology validation.

Every question comes from graph facts. A ``QuestionKind`` proposes a candidate (subject,
key, distractors) and knows the predicate ``holds(option)`` that makes an option correct;
``validate`` then proves, against the graph, that exactly the key satisfies it, that every
distractor is of the key's type, and that no two options are ancestor/descendant/synonym
(or numbered subtypes of one disease family). Candidates that fail are dropped and counted
by reason. Entities (diseases, genes, ICD-10-CM categories) are assigned to train/val/test
by a seeded hash, and a question only uses entities of its own split. The train split is
partitioned once more, the same way, into three *uses* (``USES``): questions whose labelled
chains train the PRM, questions that become SFT targets, and the GRPO prompts. A disease
*family* (a disease's ``series_name``: numbered subtypes such as "Noonan syndrome 1" and
"Noonan syndrome 3" are one family) is the unit of the split, and so are genes and ICD-10-CM
categories, so no question and no disease family is shared by two uses.
"""

from __future__ import annotations

import abc
import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable

from balancedbio.data.formatting import LETTERS
from balancedbio.data.kg import INHERITANCE_MODES, PHENOTYPIC_ABNORMALITY, KnowledgeGraph, normalise_name, series_name

SPLITS = ("train", "val", "test")
USES = ("prm", "sft", "grpo")  # the three disjoint parts of the train split
MIN_TERM_DEPTH = 4  # skip vague phenotypes such as "Abnormality of the nervous system"


def _unit_interval(entity: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{entity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def entity_split(entity: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of an entity: the same entity lands in the same split every run."""
    u = _unit_interval(entity, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def entity_use(entity: str, seed: int, val_fraction: float, test_fraction: float,
               use_fractions: dict[str, float]) -> str:
    """Which use (PRM / SFT / GRPO) a train entity serves: the rest of its hash interval, cut
    in proportion to ``use_fractions`` (one hash, so the val/test assignment is unchanged)."""
    train_start = test_fraction + val_fraction
    v = (_unit_interval(entity, seed) - train_start) / (1.0 - train_start)
    total = sum(use_fractions[u] for u in USES)
    edge = 0.0
    for use in USES[:-1]:
        edge += use_fractions[use] / total
        if v < edge:
            return use
    return USES[-1]


def partition_label(split: str, use: str | None) -> str:
    return f"{split}:{use}" if use else split


def parse_partition(label: str) -> tuple[str, str | None]:
    split, _, use = label.partition(":")
    return split, use or None


def lower_first(text: str) -> str:
    """'Recurrent pneumonia' -> 'recurrent pneumonia', but keep 'CD4-positive' or 'EEG' intact."""
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


def fact(relation: str, subject: str, obj: str, negated: bool = False) -> dict:
    return {"relation": relation, "subject": subject, "object": obj, "negated": negated}


@dataclass
class Candidate:
    kind: str
    subject: str
    key: str
    distractors: list[str]
    presented: list[str] = field(default_factory=list)  # phenotypes shown in a differential stem


class Splitter:
    """Partition of an entity: its split, and for train entities (when ``use_fractions`` is
    given) its use, as one label such as "test" or "train:prm". Numbered subtypes of one
    disease family share a partition, so that 'Noonan syndrome 1' in train cannot leak
    'Noonan syndrome 3' in test, nor from the PRM's questions into the GRPO prompts."""

    def __init__(self, seed: int, val_fraction: float, test_fraction: float, kg: KnowledgeGraph | None = None,
                 use_fractions: dict[str, float] | None = None):
        self.seed, self.val, self.test, self.kg = seed, val_fraction, test_fraction, kg
        self.use_fractions = use_fractions
        if use_fractions is not None:
            unknown = sorted(set(use_fractions) ^ set(USES))
            if unknown or any(v <= 0 for v in use_fractions.values()):
                raise ValueError(f"kg.use_fractions must give a positive share to each of {list(USES)}, "
                                 f"got {use_fractions}")

    def unit(self, entity: str) -> str:
        """What is hashed: a disease's family, else the entity itself (gene, ICD category)."""
        if self.kg is not None and entity in self.kg.diseases:
            return disease_family(self.kg, entity)
        return entity

    def __call__(self, entity: str) -> str:
        unit = self.unit(entity)
        split = entity_split(unit, self.seed, self.val, self.test)
        if split != "train" or self.use_fractions is None:
            return split
        return partition_label(split, entity_use(unit, self.seed, self.val, self.test, self.use_fractions))

    def labels(self) -> list[str]:
        if self.use_fractions is None:
            return list(SPLITS)
        return [partition_label("train", u) for u in USES] + ["val", "test"]


def disease_family(kg: KnowledgeGraph, disease_id: str) -> str:
    """The disease's family key: its name without a subtype number ('family:noonan syndrome')."""
    return "family:" + series_name(kg.diseases[disease_id].name)


def option_type(kg: KnowledgeGraph, node: str) -> str:
    if node in kg.diseases:
        return "disease"
    if node in kg.terms:
        return "inheritance" if kg.is_inheritance_mode(node) else "phenotype" if kg.is_phenotype(node) else "term"
    if node in kg.icd_chapters:
        return "icd_chapter"
    if node in kg.icd_blocks:
        return "icd_block"
    if node in kg.genes:
        return "gene"
    return "unknown"


def options_related(kg: KnowledgeGraph, a: str, b: str) -> bool:
    """Two options a reader could not tell apart: same, hierarchy-linked, synonyms, or one family."""
    if a == b:
        return True
    if a in kg.terms and b in kg.terms:
        return kg.terms_related(a, b)
    if a in kg.diseases and b in kg.diseases:
        return series_name(kg.diseases[a].name) == series_name(kg.diseases[b].name)
    return normalise_name(kg.name(a)) == normalise_name(kg.name(b))


def split_entities(kg: KnowledgeGraph, cand: Candidate) -> list[str]:
    """Diseases, genes and ICD categories named anywhere in the question (they define its split)."""
    nodes = [cand.subject, cand.key, *cand.distractors]
    return [n for n in nodes if n in kg.diseases or n in kg.genes or n in kg.icd]


class QuestionKind(abc.ABC):
    """One kind of question: which subjects it asks about, its correctness predicate, its facts."""

    name: str
    option_type: str
    stems: tuple[str, ...]

    @abc.abstractmethod
    def subjects(self, kg: KnowledgeGraph) -> list[str]:
        ...

    @abc.abstractmethod
    def holds(self, kg: KnowledgeGraph, cand: Candidate, option: str) -> bool:
        ...

    @abc.abstractmethod
    def propose(self, kg: KnowledgeGraph, subject: str, rng: random.Random, pools: "Pools") -> Candidate | None:
        ...

    def stem_fields(self, kg: KnowledgeGraph, cand: Candidate) -> dict[str, str]:
        return {"subject": kg.name(cand.subject)}

    # Facts for reasoning chains ----------------------------------------------------------
    @abc.abstractmethod
    def support(self, kg: KnowledgeGraph, cand: Candidate) -> list[dict]:
        """True facts that make the key correct."""
        ...

    @abc.abstractmethod
    def eliminate(self, kg: KnowledgeGraph, cand: Candidate, distractor: str) -> dict:
        """A true fact that rules the distractor out."""
        ...

    @abc.abstractmethod
    def corrupt(self, kg: KnowledgeGraph, cand: Candidate, distractor: str) -> dict:
        """A false fact that would make the distractor look correct."""
        ...

    def irrelevant(self, kg: KnowledgeGraph, cand: Candidate, rng: random.Random) -> dict | None:
        """A true fact about the question's entities that does not decide between the options."""
        return None

    @abc.abstractmethod
    def asks_for(self) -> str:
        ...


class Pools:
    """Per-split candidate pools for distractors (only entities of the question's split)."""

    def __init__(self, kg: KnowledgeGraph, splitter: Splitter):
        self.kg = kg
        self.splitter = splitter
        self.diseases = {s: [] for s in splitter.labels()}
        for disease_id in sorted(kg.diseases):
            self.diseases[splitter(disease_id)].append(disease_id)
        self.genes = {s: [] for s in splitter.labels()}
        for gene in sorted(kg.genes):
            self.genes[splitter(gene)].append(gene)
        counts: dict[str, int] = {}
        for disease in kg.diseases.values():
            for term in disease.phenotypes:
                counts[term] = counts.get(term, 0) + 1
        # Common, specific phenotypes make plausible distractors.
        self.phenotypes = sorted(t for t, c in counts.items()
                                 if c >= 5 and kg.is_phenotype(t) and len(kg.ancestors(t)) >= MIN_TERM_DEPTH)
        self.phenotype_system = {t: self.organ_system(t) for t in self.phenotypes}
        self.by_system: dict[str, list[str]] = {}
        for term, system in self.phenotype_system.items():
            self.by_system.setdefault(system, []).append(term)

    def organ_system(self, term: str) -> str:
        """The top-level organ-system branch of a phenotype (a child of 'Phenotypic abnormality')."""
        for ancestor in sorted(self.kg.ancestors(term) | {term}):
            if PHENOTYPIC_ABNORMALITY in self.kg.terms[ancestor].parents:
                return ancestor
        return PHENOTYPIC_ABNORMALITY


def _specific_phenotypes(kg: KnowledgeGraph, disease_id: str, min_frequency: float | None) -> list[str]:
    found = []
    for term, freq in kg.diseases[disease_id].phenotypes.items():
        if not kg.is_phenotype(term) or len(kg.ancestors(term)) < MIN_TERM_DEPTH:
            continue
        if min_frequency is not None and freq is not None and freq < min_frequency:
            continue
        found.append(term)
    return found


def _pick_unrelated(kg: KnowledgeGraph, candidates: Iterable[str], k: int, rng: random.Random,
                    accept: Callable[[str], bool], avoid: Iterable[str] = ()) -> list[str] | None:
    """Up to k candidates passing ``accept`` and pairwise unrelated to each other and to ``avoid``."""
    pool = list(dict.fromkeys(candidates))
    rng.shuffle(pool)
    chosen: list[str] = []
    taken = list(avoid)
    for node in pool:
        if len(chosen) == k:
            break
        if accept(node) and not any(options_related(kg, node, other) for other in taken):
            chosen.append(node)
            taken.append(node)
    return chosen if len(chosen) == k else None


def _similar_diseases(kg: KnowledgeGraph, disease_id: str, rng: random.Random, limit: int = 60) -> list[str]:
    """Diseases sharing specific phenotypes with ``disease_id`` (plausible distractors)."""
    terms = _specific_phenotypes(kg, disease_id, None)
    rng.shuffle(terms)
    found: list[str] = []
    for term in terms[:6]:
        found.extend(sorted(kg.diseases_with_term(term)))
        if len(found) >= limit:
            break
    return [d for d in found if d != disease_id]


class GeneOfDisease(QuestionKind):
    name, option_type = "gene_of_disease", "gene"
    stems = (
        "Pathogenic variants in which gene cause {subject}?",
        "{subject} is caused by mutations in which of the following genes?",
        "Which gene is implicated in {subject}?",
    )

    def subjects(self, kg):
        return sorted(d for d, v in kg.diseases.items() if 1 <= len(v.genes) <= 2)

    def holds(self, kg, cand, option):
        return kg.gene_causes(option, cand.subject)

    def propose(self, kg, subject, rng, pools):
        split = pools.splitter(subject)
        keys = [g for g in kg.diseases[subject].genes if pools.splitter(g) == split]
        if not keys:
            return None
        key = rng.choice(keys)
        # Genes of sibling subtypes ("X type 2" for "X type 1") would be unfair distractors.
        sibling_genes = {g for d in kg.diseases_in_series(subject) if d != subject for g in kg.diseases[d].genes}
        similar_genes = [g for d in _similar_diseases(kg, subject, rng) for g in kg.diseases[d].genes]
        pool = [g for g in similar_genes if pools.splitter(g) == split]
        pool += rng.sample(pools.genes[split], min(40, len(pools.genes[split])))
        # Plausibility only: whether a distractor is really wrong is `validate`'s job.
        distractors = _pick_unrelated(kg, pool, 3, rng, lambda g: g not in sibling_genes, avoid=[key])
        return Candidate(self.name, subject, key, distractors) if distractors else None

    def support(self, kg, cand):
        return [fact("caused_by_gene", cand.subject, cand.key)]

    def eliminate(self, kg, cand, distractor):
        return fact("caused_by_gene", cand.subject, distractor, negated=True)

    def corrupt(self, kg, cand, distractor):
        return fact("caused_by_gene", cand.subject, distractor)

    def irrelevant(self, kg, cand, rng):
        return _irrelevant_disease_fact(kg, cand.subject, rng, exclude={"caused_by_gene"})

    def asks_for(self):
        return "the gene whose pathogenic variants cause the disease"


class DiseaseOfGene(QuestionKind):
    name, option_type = "disease_of_gene", "disease"
    stems = (
        "Pathogenic variants in {subject} cause which of the following conditions?",
        "Which disease is associated with mutations in the {subject} gene?",
        "A patient carries a pathogenic variant in {subject}. Which diagnosis does this gene point to?",
    )

    def subjects(self, kg):
        return sorted(g for g, diseases in kg.genes.items() if 1 <= len(diseases) <= 3)

    def holds(self, kg, cand, option):
        return kg.gene_causes(cand.subject, option)

    def propose(self, kg, subject, rng, pools):
        split = pools.splitter(subject)
        keys = sorted(d for d in kg.genes[subject] if pools.splitter(d) == split)
        if not keys:
            return None
        key = rng.choice(keys)
        pool = [d for d in _similar_diseases(kg, key, rng) if pools.splitter(d) == split]
        pool += rng.sample(pools.diseases[split], min(40, len(pools.diseases[split])))
        distractors = _pick_unrelated(kg, pool, 3, rng, lambda d: True, avoid=[key])
        return Candidate(self.name, subject, key, distractors) if distractors else None

    def support(self, kg, cand):
        return [fact("caused_by_gene", cand.key, cand.subject)]

    def eliminate(self, kg, cand, distractor):
        return fact("caused_by_gene", distractor, cand.subject, negated=True)

    def corrupt(self, kg, cand, distractor):
        return fact("caused_by_gene", distractor, cand.subject)

    def irrelevant(self, kg, cand, rng):
        return _irrelevant_disease_fact(kg, cand.key, rng, exclude={"caused_by_gene", "has_phenotype"})

    def asks_for(self):
        return "the condition caused by variants in this gene"


class PhenotypeOfDisease(QuestionKind):
    name, option_type = "phenotype_of_disease", "phenotype"
    stems = (
        "Which of the following is a clinical feature of {subject}?",
        "A patient with {subject} is most likely to show which finding?",
        "Which phenotype is characteristic of {subject}?",
    )

    def subjects(self, kg):
        return sorted(d for d in kg.diseases if len(_specific_phenotypes(kg, d, 0.3)) >= 3)

    def holds(self, kg, cand, option):
        return kg.disease_may_have_phenotype(cand.subject, option)

    def propose(self, kg, subject, rng, pools):
        keys = _specific_phenotypes(kg, subject, 0.3)
        key = rng.choice(keys)
        system = pools.organ_system(key)
        pool = list(pools.by_system.get(system, []))
        pool = rng.sample(pool, min(80, len(pool))) + rng.sample(pools.phenotypes, 80)
        distractors = _pick_unrelated(kg, pool, 3, rng, lambda t: True, avoid=[key])
        return Candidate(self.name, subject, key, distractors) if distractors else None

    def support(self, kg, cand):
        return [fact("has_phenotype", cand.subject, cand.key)]

    def eliminate(self, kg, cand, distractor):
        return fact("has_phenotype", cand.subject, distractor, negated=True)

    def corrupt(self, kg, cand, distractor):
        return fact("has_phenotype", cand.subject, distractor)

    def irrelevant(self, kg, cand, rng):
        return _irrelevant_disease_fact(kg, cand.subject, rng, exclude={"has_phenotype"})

    def asks_for(self):
        return "a clinical feature recorded for the disease"


class NotAFeature(QuestionKind):
    name, option_type = "not_a_feature", "phenotype"
    stems = (
        "Which of the following is NOT a feature of {subject}?",
        "All of the following are features of {subject} EXCEPT:",
        "Which finding would be unexpected in {subject}?",
    )

    def subjects(self, kg):
        return sorted(d for d in kg.diseases if len(_specific_phenotypes(kg, d, 0.3)) >= 4)

    def holds(self, kg, cand, option):
        return not kg.disease_may_have_phenotype(cand.subject, option)

    def propose(self, kg, subject, rng, pools):
        features = _pick_unrelated(kg, _specific_phenotypes(kg, subject, 0.3), 3, rng,
                                   lambda t: kg.disease_has_phenotype(subject, t))
        if not features:
            return None
        system = pools.organ_system(features[0])
        pool = rng.sample(pools.by_system.get(system, []), min(60, len(pools.by_system.get(system, []))))
        pool += rng.sample(pools.phenotypes, 60)
        key = _pick_unrelated(kg, pool, 1, rng, lambda t: not kg.disease_may_have_phenotype(subject, t),
                              avoid=features)
        return Candidate(self.name, subject, key[0], features) if key else None

    def support(self, kg, cand):
        return [fact("has_phenotype", cand.subject, cand.key, negated=True)]

    def eliminate(self, kg, cand, distractor):
        return fact("has_phenotype", cand.subject, distractor)

    def corrupt(self, kg, cand, distractor):
        return fact("has_phenotype", cand.subject, distractor, negated=True)

    def irrelevant(self, kg, cand, rng):
        return _irrelevant_disease_fact(kg, cand.subject, rng, exclude={"has_phenotype"})

    def asks_for(self):
        return "the one finding that is not a feature of the disease"


class InheritanceMode(QuestionKind):
    name, option_type = "inheritance_mode", "inheritance"
    stems = (
        "What is the mode of inheritance of {subject}?",
        "{subject} is inherited in which pattern?",
        "How is {subject} transmitted in families?",
    )

    def subjects(self, kg):
        return sorted(d for d, v in kg.diseases.items()
                      if len([m for m in v.inheritance if m in INHERITANCE_MODES]) == 1)

    def holds(self, kg, cand, option):
        return kg.disease_has_inheritance(cand.subject, option)

    def propose(self, kg, subject, rng, pools):
        key = next(m for m in kg.diseases[subject].inheritance if m in INHERITANCE_MODES)
        distractors = _pick_unrelated(kg, sorted(INHERITANCE_MODES), 3, rng, lambda m: True, avoid=[key])
        return Candidate(self.name, subject, key, distractors) if distractors else None

    def support(self, kg, cand):
        return [fact("has_inheritance", cand.subject, cand.key)]

    def eliminate(self, kg, cand, distractor):
        return fact("has_inheritance", cand.subject, distractor, negated=True)

    def corrupt(self, kg, cand, distractor):
        return fact("has_inheritance", cand.subject, distractor)

    def irrelevant(self, kg, cand, rng):
        return _irrelevant_disease_fact(kg, cand.subject, rng, exclude={"has_inheritance"})

    def asks_for(self):
        return "the mode of inheritance of the disease"


class Differential(QuestionKind):
    name, option_type = "differential_diagnosis", "disease"
    stems = (
        "A patient presents with {p1}, {p2} and {p3}. Which diagnosis best explains these findings?",
        "Which condition is characterised by the combination of {p1}, {p2} and {p3}?",
        "{p1}, {p2} and {p3} together suggest which of the following diagnoses?",
    )

    def subjects(self, kg):
        return sorted(d for d in kg.diseases if len(_specific_phenotypes(kg, d, 0.5)) >= 3)

    def holds(self, kg, cand, option):
        return all(kg.disease_may_have_phenotype(option, p) for p in cand.presented)

    def propose(self, kg, subject, rng, pools):
        presented = _pick_unrelated(kg, _specific_phenotypes(kg, subject, 0.5), 3, rng,
                                    lambda t: kg.disease_has_phenotype(subject, t))
        if not presented:
            return None
        split = pools.splitter(subject)
        cand = Candidate(self.name, subject, subject, [], presented=presented)
        pool = [d for p in presented for d in sorted(kg.diseases_with_term(p)) if pools.splitter(d) == split]
        pool += rng.sample(pools.diseases[split], min(40, len(pools.diseases[split])))
        distractors = _pick_unrelated(kg, pool, 3, rng, lambda d: True, avoid=[subject])
        if not distractors:
            return None
        cand.distractors = distractors
        return cand

    def stem_fields(self, kg, cand):
        return {f"p{i}": lower_first(kg.name(p)) for i, p in enumerate(cand.presented, start=1)}

    def support(self, kg, cand):
        return [fact("has_phenotype", cand.key, p) for p in cand.presented]

    def _missing(self, kg, cand, distractor):
        return next(p for p in cand.presented if not kg.disease_may_have_phenotype(distractor, p))

    def eliminate(self, kg, cand, distractor):
        return fact("has_phenotype", distractor, self._missing(kg, cand, distractor), negated=True)

    def corrupt(self, kg, cand, distractor):
        return fact("has_phenotype", distractor, self._missing(kg, cand, distractor))

    def irrelevant(self, kg, cand, rng):
        return _irrelevant_disease_fact(kg, cand.key, rng, exclude={"has_phenotype"})

    def asks_for(self):
        return "the diagnosis that has all of the presented findings"


class IcdChapter(QuestionKind):
    name, option_type = "icd10_chapter", "icd_chapter"
    stems = (
        "In ICD-10-CM, '{subject}' is classified in which chapter?",
        "Which ICD-10-CM chapter contains the category '{subject}'?",
        "Under ICD-10-CM, a diagnosis of '{subject}' is coded in which chapter?",
    )

    def subjects(self, kg):
        return sorted(kg.icd)

    def holds(self, kg, cand, option):
        return kg.icd_in_chapter(cand.subject, option)

    def propose(self, kg, subject, rng, pools):
        key = kg.icd[subject].chapter
        distractors = _pick_unrelated(kg, sorted(kg.icd_chapters), 3, rng, lambda c: True, avoid=[key])
        return Candidate(self.name, subject, key, distractors) if distractors else None

    def support(self, kg, cand):
        return [fact("icd_chapter", cand.subject, cand.key)]

    def eliminate(self, kg, cand, distractor):
        return fact("icd_chapter", cand.subject, distractor, negated=True)

    def corrupt(self, kg, cand, distractor):
        return fact("icd_chapter", cand.subject, distractor)

    def irrelevant(self, kg, cand, rng):
        return fact("icd_code", cand.subject, kg.icd[cand.subject].description)

    def asks_for(self):
        return "the ICD-10-CM chapter of the category"


class IcdBlock(QuestionKind):
    name, option_type = "icd10_block", "icd_block"
    stems = (
        "Which ICD-10-CM block contains the category '{subject}'?",
        "In ICD-10-CM, '{subject}' falls within which block of codes?",
        "'{subject}' is grouped under which ICD-10-CM block?",
    )

    def subjects(self, kg):
        return sorted(kg.icd)

    def holds(self, kg, cand, option):
        return kg.icd_in_block(cand.subject, option)

    def propose(self, kg, subject, rng, pools):
        entry = kg.icd[subject]
        if entry.block in kg.icd:  # a one-category block shares its code with the category
            return None
        same_chapter = sorted({e.block for e in kg.icd.values() if e.chapter == entry.chapter and e.block not in kg.icd})
        pool = same_chapter if len(same_chapter) >= 4 else sorted(kg.icd_blocks)
        distractors = _pick_unrelated(kg, pool, 3, rng, lambda b: True, avoid=[entry.block])
        return Candidate(self.name, subject, entry.block, distractors) if distractors else None

    def support(self, kg, cand):
        return [fact("icd_block", cand.subject, cand.key)]

    def eliminate(self, kg, cand, distractor):
        return fact("icd_block", cand.subject, distractor, negated=True)

    def corrupt(self, kg, cand, distractor):
        return fact("icd_block", cand.subject, distractor)

    def irrelevant(self, kg, cand, rng):
        return fact("icd_chapter", cand.subject, kg.icd[cand.subject].chapter)

    def asks_for(self):
        return "the ICD-10-CM block of the category"


def _irrelevant_disease_fact(kg: KnowledgeGraph, disease_id: str, rng: random.Random, exclude: set[str]) -> dict | None:
    disease = kg.diseases[disease_id]
    options = []
    if "has_inheritance" not in exclude:
        options += [fact("has_inheritance", disease_id, m) for m in disease.inheritance if m in INHERITANCE_MODES]
    if "caused_by_gene" not in exclude:
        options += [fact("caused_by_gene", disease_id, g) for g in disease.genes]
    if "has_phenotype" not in exclude:
        options += [fact("has_phenotype", disease_id, t) for t in _specific_phenotypes(kg, disease_id, 0.3)[:5]]
    return rng.choice(options) if options else None


QUESTION_KINDS: dict[str, QuestionKind] = {k.name: k for k in (
    GeneOfDisease(), DiseaseOfGene(), PhenotypeOfDisease(), NotAFeature(), InheritanceMode(),
    Differential(), IcdChapter(), IcdBlock(),
)}


def validate(kg: KnowledgeGraph, cand: Candidate, splitter: Splitter | None = None) -> str | None:
    """Why the candidate is not a sound single-answer question, or None when it is."""
    kind = QUESTION_KINDS[cand.kind]
    options = [cand.key, *cand.distractors]
    if len(cand.distractors) != 3 or len(set(options)) != 4:
        return "not_four_distinct_options"
    if any(option_type(kg, o) != kind.option_type for o in options):
        return "distractor_type_mismatch"
    if not kind.holds(kg, cand, cand.key):
        return "key_not_supported"
    if any(kind.holds(kg, cand, d) for d in cand.distractors):
        return "ambiguous_more_than_one_answer"
    if any(options_related(kg, a, b) for i, a in enumerate(options) for b in options[i + 1:]):
        return "options_related_in_ontology"
    if len({normalise_name(kg.name(o)) for o in options}) != 4:
        return "duplicate_option_text"
    if splitter is not None and len({splitter(e) for e in split_entities(kg, cand)}) > 1:
        return "entities_cross_splits"
    return None


def render_question(kg: KnowledgeGraph, cand: Candidate, rng: random.Random, split: str, index: int,
                    use: str | None = None) -> dict:
    kind = QUESTION_KINDS[cand.kind]
    template = rng.randrange(len(kind.stems))
    question = kind.stems[template].format(**kind.stem_fields(kg, cand))
    question = question[0].upper() + question[1:]
    ordered = [cand.key, *cand.distractors]
    rng.shuffle(ordered)
    options = {LETTERS[i]: kg.name(node) for i, node in enumerate(ordered)}
    answer = LETTERS[ordered.index(cand.key)]
    provenance = kind.support(kg, cand) + [kind.eliminate(kg, cand, d) for d in cand.distractors]
    diseases = sorted({n for n in split_entities(kg, cand) if n in kg.diseases})
    row = {
        "id": f"kg-{split}-{index:06d}",
        "split": split,
        "kind": cand.kind,
        "template": template,
        "question": question,
        "options": options,
        "answer": answer,
        "answer_text": options[answer],
        "option_ids": {LETTERS[i]: node for i, node in enumerate(ordered)},
        "subject": cand.subject,
        "presented": cand.presented,
        "entities": {
            "diseases": diseases,
            "genes": sorted({n for n in split_entities(kg, cand) if n in kg.genes}),
            "icd10cm": sorted({n for n in split_entities(kg, cand) if n in kg.icd}),
        },
        "families": sorted({disease_family(kg, d) for d in diseases}),
        "provenance": provenance,
    }
    if use is not None:
        row["use"] = use
    return row


def candidate_from_row(row: dict) -> Candidate:
    """Rebuild the candidate behind a question row (to re-validate or to build its reasoning)."""
    key = row["option_ids"][row["answer"]]
    distractors = [node for letter, node in row["option_ids"].items() if letter != row["answer"]]
    return Candidate(row["kind"], row["subject"], key, distractors, presented=list(row.get("presented", [])))


def generate_questions(kg: KnowledgeGraph, *, num_questions: int, kinds: dict[str, float], seed: int,
                       val_fraction: float, test_fraction: float, use_fractions: dict[str, float] | None = None,
                       progress: bool = True) -> tuple[list[dict], dict]:
    """Generate validated questions; return (rows in split order, statistics incl. drop reasons).

    With ``use_fractions`` every train question also carries its ``use`` (see ``USES``)."""
    from tqdm.auto import tqdm

    unknown = sorted(set(kinds) - set(QUESTION_KINDS))
    if unknown:
        raise ValueError(f"unknown question kinds {unknown}; known: {sorted(QUESTION_KINDS)}")
    splitter = Splitter(seed, val_fraction, test_fraction, kg, use_fractions)
    pools = Pools(kg, splitter)
    total_weight = sum(kinds.values())
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    stats: dict = {"requested": num_questions, "per_kind": {}, "dropped": {}}
    bar = tqdm(total=num_questions, desc="questions", disable=not progress)
    for kind_name, weight in kinds.items():
        kind = QUESTION_KINDS[kind_name]
        quota = round(num_questions * weight / total_weight)
        rng = random.Random(f"{seed}:{kind_name}")
        subjects = kind.subjects(kg)
        rng.shuffle(subjects)
        made, dropped = 0, {}
        for subject in subjects:
            if made >= quota:
                break
            cand = kind.propose(kg, subject, rng, pools)
            if cand is None:
                dropped["no_valid_distractors"] = dropped.get("no_valid_distractors", 0) + 1
                continue
            reason = validate(kg, cand, splitter)
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            split, use = parse_partition(splitter(split_entities(kg, cand)[0]))
            rows[split].append(render_question(kg, cand, rng, split, 0, use))
            made += 1
            bar.update()
        stats["per_kind"][kind_name] = {"requested": quota, "made": made, "subjects_available": len(subjects)}
        stats["dropped"][kind_name] = dropped
    bar.close()
    out: list[dict] = []
    for split in SPLITS:
        for index, row in enumerate(rows[split]):
            row["id"] = f"kg-{split}-{index:06d}"
            out.append(row)
        stats[f"n_{split}"] = len(rows[split])
    if use_fractions is not None:
        stats["train_uses"] = {use: sum(r.get("use") == use for r in rows["train"]) for use in USES}
    return out, stats
