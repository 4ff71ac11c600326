"""Writes the slices of ECS and OCSF that tests/test_ecs.py checks alerts against.

Only the definitions the alerts can touch are kept, resolved and flattened, so the
tests need neither repository nor network. Run from the repository root:

    python tests/data/vendor_slices.py ECS_CHECKOUT OCSF_CHECKOUT

with ``ECS_CHECKOUT`` a checkout of github.com/elastic/ecs at tag v8.17.0 and
``OCSF_CHECKOUT`` one of github.com/ocsf/ocsf-schema at tag v1.8.0. (A bare mirror
works too: ``git -C mirror worktree add /tmp/ecs v8.17.0``.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
ECS_TAG, OCSF_TAG = "v8.17.0", "v1.8.0"

# ECS fields the alerts use, and their neighbours a future field would come from.
ECS_PREFIXES = ("@timestamp", "message", "tags", "labels", "ecs.", "event.", "rule.",
                "threat.framework", "threat.tactic.", "threat.technique.", "user.id",
                "user.name", "user.domain", "source.ip", "source.address", "source.domain",
                "source.port")
# OCSF objects the Detection Finding output reaches (others fail the test as unknown).
OCSF_OBJECTS = ("metadata", "product", "finding_info", "analytic", "attack", "technique",
                "sub_technique", "tactic", "resource_details", "evidences", "actor", "user",
                "network_endpoint")
OCSF_CLASS = ("events/findings/detection_finding.json", "events/findings/finding.json",
              "events/base_event.json")


def ecs_slice(checkout: Path) -> dict:
    flat = yaml.safe_load((checkout / "generated/ecs/ecs_flat.yml").read_text())
    version = (checkout / "version").read_text().strip()
    fields = {}
    for name, spec in sorted(flat.items()):
        if not name.startswith(ECS_PREFIXES) or name.startswith("threat.indicator"):
            continue
        entry = {"type": spec["type"], "level": spec["level"]}
        if spec.get("normalize"):
            entry["normalize"] = spec["normalize"]
        if spec.get("allowed_values"):
            entry["allowed_values"] = {
                v["name"]: v.get("expected_event_types") for v in spec["allowed_values"]}
        fields[name] = entry
    field_sets = sorted({name.split(".")[0] for name in flat if "." in name})
    return {"ecs_version": version,
            "source": f"https://github.com/elastic/ecs/blob/{ECS_TAG}/generated/ecs/ecs_flat.yml",
            "note": "a slice: the fields under the prefixes below, as ecs_flat.yml defines them",
            "prefixes": list(ECS_PREFIXES), "field_sets": field_sets, "fields": fields}


class OCSF:
    def __init__(self, root: Path):
        self.root = root
        dictionary = json.loads((root / "dictionary.json").read_text())
        self.dictionary = dictionary["attributes"]
        self.types = dictionary["types"]["attributes"]
        self.objects = {}
        for path in (root / "objects").glob("*.json"):
            doc = json.loads(path.read_text())
            self.objects[doc["name"]] = doc

    def _own(self, doc: dict) -> dict:
        """A definition's attributes with its ``$include`` files merged in (own win).

        A profile's attributes count only where the profile is applied: they keep
        its name in ``profile``, unless the definition says ``"profile": null``."""
        attributes = {}
        for include in doc.get("attributes", {}).get("$include", []):
            included = json.loads((self.root / include).read_text())
            profile = included.get("name") if included.get("meta") == "profile" else None
            for name, spec in included["attributes"].items():
                attributes[name] = {**spec, "profile": profile}
        for name, spec in doc.get("attributes", {}).items():
            if name != "$include":
                attributes[name] = {**attributes.get(name, {}), **(spec or {})}
        return attributes

    def _chain(self, docs: list[dict]) -> dict:
        """Attributes along an ``extends`` chain, base first; a child's keys win."""
        merged: dict = {}
        for doc in docs:
            for name, spec in self._own(doc).items():
                merged[name] = {**merged.get(name, {}), **spec}
        return merged

    def _object_chain(self, name: str) -> list[dict]:
        chain = []
        while name in self.objects:
            chain.insert(0, self.objects[name])
            name = self.objects[name].get("extends")
        return chain

    def _resolve(self, attributes: dict) -> dict:
        out = {}
        for name, spec in sorted(attributes.items()):
            base = self.dictionary.get(name, {})
            kind = spec.get("type") or base.get("type")
            entry = {"type": kind, "requirement": spec.get("requirement", "optional")}
            if kind in self.types and self.types[kind].get("type"):
                entry["base_type"] = self.types[kind]["type"]
            if spec.get("is_array", base.get("is_array")):
                entry["is_array"] = True
            enum = spec.get("enum") or base.get("enum")
            if enum:
                entry["enum"] = {k: v.get("caption") for k, v in enum.items()}
            sibling = spec.get("sibling") or base.get("sibling")
            if sibling:
                entry["sibling"] = sibling
            if spec.get("profile"):
                entry["profile"] = spec["profile"]
            out[name] = entry
        return out

    def slice(self) -> dict:
        docs = [json.loads((self.root / p).read_text()) for p in reversed(OCSF_CLASS)]
        objects = {}
        for name in OCSF_OBJECTS:
            chain = self._object_chain(name)
            constraints = {}
            for doc in chain:
                constraints.update(doc.get("constraints", {}))
            objects[name] = {"attributes": self._resolve(self._chain(chain)),
                             "constraints": constraints}
        version = json.loads((self.root / "version.json").read_text())["version"]
        attributes = self._resolve(self._chain(docs))
        # What the schema compiler derives: the class and category uids, and type_uid
        # (class_uid * 100 + activity_id) with its caption.
        category = json.loads((self.root / "categories.json").read_text())["attributes"][
            next(doc["category"] for doc in reversed(docs) if "category" in doc)]
        class_uid = category["uid"] * 1000 + docs[-1]["uid"]
        attributes["category_uid"]["enum"] = {str(category["uid"]): category["caption"]}
        attributes["class_uid"]["enum"] = {str(class_uid): docs[-1]["caption"]}
        attributes["type_uid"]["enum"] = {
            str(class_uid * 100 + int(k)): f"{docs[-1]['caption']}: {v}"
            for k, v in attributes["activity_id"]["enum"].items()}
        return {"ocsf_version": version,
                "source": f"https://github.com/ocsf/ocsf-schema/tree/{OCSF_TAG}: "
                          + ", ".join([*OCSF_CLASS, "dictionary.json", "objects/*.json",
                                       "profiles/*.json ($include)"]),
                "note": "class 2004 and the objects it reaches in modelwatch's output, "
                        "resolved (extends, $include, dictionary types and enums)",
                "class": {"uid": class_uid, "name": docs[-1]["name"],
                          "caption": docs[-1]["caption"], "attributes": attributes},
                "types": {k: v.get("type") for k, v in self.types.items()},
                "objects": objects}


def main(ecs_checkout: str, ocsf_checkout: str) -> None:
    for name, doc in (("ecs_fields.json", ecs_slice(Path(ecs_checkout))),
                      ("ocsf_detection_finding.json", OCSF(Path(ocsf_checkout)).slice())):
        (HERE / name).write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main(*sys.argv[1:])
