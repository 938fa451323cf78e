"""MKGSG question kinds: candidates, distractor pools, and the eight ``QuestionKind``s with their facts."""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable

from balancedbio.data.kg import INHERITANCE_MODES, PHENOTYPIC_ABNORMALITY, KnowledgeGraph, normalise_name, series_name
from balancedbio.data.splits import MIN_TERM_DEPTH, SPLITS, USES, entity_split, entity_use, partition_label



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


