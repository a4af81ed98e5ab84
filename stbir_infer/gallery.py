"""The gallery in memory: an HNSW index (hnswlib, cosine) of unit vectors plus its metadata.

``items`` maps HNSW label -> content sha256 (one vector per distinct content); ``files`` maps
path -> {sha256, size, mtime_ns, label, and ``tags`` {key: value} when tagged}; ``paths`` maps
label -> the sorted paths showing that content; ``skipped`` remembers files that were not images
(or were removed on purpose), so an unchanged one is not read again. Paths are absolute in
memory and stored relative to their enrolled root (``roots``) on disk (``stbir_infer.roots``).
Paths are kept as ``os.fsdecode`` gives them (undecodable bytes as lone surrogates, which
meta.json stores as ``\\udcXX`` escapes), so ``open(path)`` opens the right file; show them with
``stbir_infer.paths.display``.

Saving and loading go through ``stbir_infer.store`` (generations, CURRENT, checksums).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stbir_infer import filters, hnsw_file, roots, store
from stbir_infer.contract import embedding_space
from stbir_infer.edge_gallery import EDGE_FILE, EdgeVectors
from stbir_infer.errors import IndexFormatError, ModelMismatchError, ParameterError, QueryError
from stbir_infer.index_meta import HnswParams

SPACE = store.SPACE
# Past this share of deleted slots, save() rebuilds the graph from the live vectors: marked
# slots cost search time (at ef 64, 100k vectors: x1.4 at 30%, x1.9 at 50%, x3.9 at 70%), and
# refilling them with replace_deleted costs recall (after 50%: 0.994 instead of 1.0 at ef 64 and
# 128); benchmarks/index.py --lifecycle.
MAX_DELETED_SHARE = 0.3


class GalleryIndex:
    """One generation of the index, in memory: hnswlib vectors + the metadata store.

    ``unsaved`` counts edits since the last load or save (0: nothing to commit)."""

    def __init__(self, *, dim: int, model: dict, params: HnswParams, meta: dict | None = None,
                 hnsw=None):
        self.dim = int(dim)
        self.model = dict(model)
        self.params = params
        meta = meta or {}
        self.generation = int(meta.get("generation", 0))
        self.format_version = int(meta.get("format_version", store.INDEX_FORMAT_VERSION))
        self.created = meta.get("created") or store.now()
        self.updated = meta.get("updated")
        self.next_label = int(meta.get("next_label", 0))
        self.items: dict[int, str] = {int(k): v["sha256"] for k, v in (meta.get("items") or {}).items()}
        self.roots: list[str] = list(meta.get("roots") or [])
        files, skipped = meta.get("files") or {}, meta.get("skipped") or {}
        if meta and self.format_version >= 3:  # stored per root, relative to it
            files, skipped = roots.join_roots(self.roots, files), roots.join_roots(self.roots, skipped)
        self.files: dict[str, dict] = dict(files)
        self.skipped: dict[str, dict] = dict(skipped)
        self._where_cache: dict = {}
        self.edges: EdgeVectors | None = None  # the edge gallery, when the index has one
        self.unsaved = 0 if meta else 1  # a new index is worth writing even when empty
        self.hnsw = hnsw if hnsw is not None else self.empty_graph(64)
        self.hnsw.set_ef(params.ef_search)
        self._rebuild_maps()

    # -- derived maps ------------------------------------------------------------------------------
    def _rebuild_maps(self) -> None:
        self.by_hash: dict[str, int] = {sha: label for label, sha in self.items.items()}
        self.paths: dict[int, list[str]] = {label: [] for label in self.items}
        for path, rec in self.files.items():
            self.paths.setdefault(int(rec["label"]), []).append(path)
        for lst in self.paths.values():
            lst.sort()

    def __len__(self) -> int:
        return len(self.items)

    # -- load / create -------------------------------------------------------------------------
    @classmethod
    def create(cls, *, dim: int, model: dict, params: HnswParams | None = None) -> GalleryIndex:
        return cls(dim=dim, model=model, params=params or HnswParams())

    @classmethod
    def load(cls, index_dir: str | Path, *, threads: int | None = None) -> GalleryIndex:
        """Load the live generation (its index.bin verified against meta.json's checksum)."""
        return store.load_current(index_dir, lambda gen_dir, meta: cls._from_generation(
            gen_dir, meta, threads=threads))

    @classmethod
    def _from_generation(cls, gen_dir: Path, meta: dict, *, threads: int | None = None) -> GalleryIndex:
        import hnswlib

        params = HnswParams(**meta["hnsw"])  # every field checked by index_meta.read_meta
        dim, labels = int(meta["dim"]), {int(k) for k in meta.get("items") or {}}
        hnsw = hnswlib.Index(space=SPACE, dim=dim)
        bin_path = gen_dir / store.INDEX_FILE
        with store.verified_file(gen_dir, meta, store.INDEX_FILE) as path:
            header = hnsw_file.check(path, dim=dim, M=params.M, shown_as=bin_path, labels=labels,
                                     ef_construction=params.ef_construction,
                                     deleted=set(meta.get("deleted") or []))
            try:
                hnsw.load_index(path, max_elements=hnsw_file.load_capacity(header),
                                allow_replace_deleted=True)
            except RuntimeError as exc:
                raise IndexFormatError(f"{bin_path}: hnswlib cannot load it ({exc})") from None
        if threads:
            hnsw.set_num_threads(int(threads))
        meta_path = gen_dir / store.META_FILE
        try:
            idx = cls(dim=dim, model=dict(meta["model"]), params=params, meta=meta, hnsw=hnsw)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IndexFormatError(f"{meta_path}: bad metadata ({type(exc).__name__})") from None
        if meta.get("edges") is not None:
            with store.verified_file(gen_dir, meta, EDGE_FILE) as path:
                idx.edges = EdgeVectors.read(path, gen_dir / EDGE_FILE, meta, dim)
        return idx

    def check_dim(self, embed_dim: int, index_dir: str | Path = "") -> None:
        if int(embed_dim) != self.dim:
            raise ModelMismatchError(f"{index_dir}: index dim {self.dim} != export embed_dim "
                                     f"{embed_dim}")

    def check_model(self, model: dict, index_dir: str | Path = "", *, query: bool = False) -> None:
        """Refuse an export other than the one this index was built with. ``query``: also let in
        an export in the index's embedding space (a student distilled from the teacher that
        enrolled it); writing to the index still takes the export that built it."""
        same_export = model.get("fingerprint") == self.model.get("fingerprint")
        space, theirs = embedding_space(self.model), embedding_space(model)
        if query and not same_export and theirs != space:
            raise ModelMismatchError(
                f"{index_dir}: index vectors are in embedding space {str(space)[:12]} (export "
                f"{str(self.model.get('fingerprint'))[:12]}), the query export "
                f"{model.get('model_dir')} in {str(theirs)[:12]}; query with an export of that "
                f"space (its own, or a student distilled from it)")
        if not query and not same_export:
            mine = self.model.get("fingerprint") or "?"
            theirs = model.get("fingerprint") or "?"
            raise ModelMismatchError(
                f"{index_dir}: index was built with export {mine[:12]} "
                f"({self.model.get('clip_model')}, {self.model.get('model_dir')}), not with "
                f"{theirs[:12]} ({model.get('model_dir')}); use that export, or another --index")
        self.check_dim(model.get("embed_dim", self.dim), index_dir)

    # -- edits (each counts in ``unsaved``) ---------------------------------------------------------
    def set_ef_search(self, ef_search: int) -> None:
        if int(ef_search) != self.params.ef_search:
            self.params = HnswParams(self.params.M, self.params.ef_construction, int(ef_search))
            self.hnsw.set_ef(self.params.ef_search)
            self.unsaved += 1

    def add_root(self, root: str) -> None:
        if root not in self.roots:
            self.roots.append(root)
            self.unsaved += 1

    def add_vectors(self, vectors: np.ndarray, hashes: list[str],
                    edge_vectors: np.ndarray | None = None) -> list[int]:
        """Add one vector per new content hash (and its pseudo-sketch's vector, which an index
        with an edge gallery needs); returns their labels."""
        if (edge_vectors is None) != (self.edges is None):
            raise ValueError("edge vectors go with an edge gallery, and only there")
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or not np.isfinite(vectors).all():
            raise ValueError(f"vectors of shape {vectors.shape} for an index of dim {self.dim}")
        if len(hashes) != len(vectors):
            raise ValueError("one hash per vector")
        if not len(hashes):
            return []
        labels = list(range(self.next_label, self.next_label + len(hashes)))
        need = self.hnsw.element_count + len(labels)
        if need > self.hnsw.max_elements:
            self.hnsw.resize_index(max(need, 2 * self.hnsw.max_elements))
        self.hnsw.add_items(vectors, np.asarray(labels, np.int64), replace_deleted=True)
        if self.edges is not None and edge_vectors is not None:  # both or neither (checked above)
            self.edges.add(labels, edge_vectors)
        self.next_label += len(labels)
        for label, sha in zip(labels, hashes):
            self.items[label] = sha
            self.by_hash[sha] = label
            self.paths.setdefault(label, [])
        self.unsaved += 1
        return labels

    def set_file(self, path: str, sha256: str, size: int, mtime_ns: int) -> None:
        """Point ``path`` at the item holding ``sha256`` (which must already be indexed)."""
        label = self.by_hash[sha256]
        old = self.files.get(path)
        if old is not None and int(old["label"]) != label:
            self._unlink(path, int(old["label"]))
        if old is None or int(old["label"]) != label:
            lst = self.paths.setdefault(label, [])
            lst.append(path)
            lst.sort()
        rec = {"sha256": sha256, "size": int(size), "mtime_ns": int(mtime_ns), "label": label}
        if old is not None and old.get("tags"):
            rec["tags"] = old["tags"]
        self.files[path] = rec
        self.skipped.pop(path, None)
        self.unsaved += 1

    def remove_file(self, path: str) -> bool:
        rec = self.files.pop(path, None)
        if rec is None:
            return False
        self._unlink(path, int(rec["label"]))
        self.unsaved += 1
        return True

    def mark_skipped(self, path: str, size: int, mtime_ns: int, reason: str,
                     export: str | None = None) -> None:
        """Remember a file that is not an image (not read again while size, mtime and, when
        given, the ``export`` fingerprint that judged it hold)."""
        rec = {"size": int(size), "mtime_ns": int(mtime_ns), "reason": reason}
        self.skipped[path] = rec if export is None else {**rec, "export": export}
        self.unsaved += 1

    def forget_skipped(self, path: str) -> None:
        if self.skipped.pop(path, None) is not None:
            self.unsaved += 1

    def tag_under(self, folder: str, tags: dict[str, str]) -> None:
        """Set ``tags`` on every file under ``folder`` (an absolute path; other tags stay)."""
        if not tags:
            return
        for path, rec in self.files.items():
            if roots.is_within(path, folder) and any(
                    (rec.get("tags") or {}).get(k) != v for k, v in tags.items()):
                rec["tags"] = {**(rec.get("tags") or {}), **tags}
                self.unsaved += 1

    def relocate(self, old: str, new: str) -> list[tuple[str, str]]:
        """Every root at or under ``old`` moves to ``new`` (with the files and skipped records
        under it); returns (old root, new root) of each (none: ``old`` holds no root). Refuses a
        move that would give two files the same path."""
        moved_roots = [(r, roots.moved(r, old, new)) for r in self.roots if roots.is_within(r, old)]
        if not moved_roots:
            return []
        files = {roots.moved(p, old, new): rec for p, rec in self.files.items()}
        skipped = {roots.moved(p, old, new): rec for p, rec in self.skipped.items()}
        if len(files) != len(self.files) or len(skipped) != len(self.skipped):
            raise ParameterError(f"{new}: the index already has files at the paths those under "
                                 f"{old} would move to")
        self.roots = list(dict.fromkeys(roots.moved(r, old, new) for r in self.roots))
        self.files, self.skipped = files, skipped
        self._rebuild_maps()
        self.unsaved += 1
        return moved_roots

    def _unlink(self, path: str, label: int) -> None:
        lst = self.paths.get(label, [])
        if path in lst:
            lst.remove(path)
        if not lst:  # no file shows this content any more: drop the vector
            self.paths.pop(label, None)
            sha = self.items.pop(label, None)
            if sha is not None and self.by_hash.get(sha) == label:
                del self.by_hash[sha]
            self.hnsw.mark_deleted(label)
            if self.edges is not None:
                self.edges.drop(label)

    def deleted_labels(self) -> list[int]:
        """Labels still in hnswlib's storage but marked deleted (slots reused by later adds)."""
        live = self.items
        return [int(x) for x in self.hnsw.get_ids_list() if int(x) not in live]

    def deleted_share(self) -> float:
        total = self.hnsw.element_count
        return (total - len(self.items)) / total if total else 0.0

    def empty_graph(self, capacity: int):
        """A new, empty hnswlib index with this index's dim and parameters."""
        import hnswlib

        hnsw = hnswlib.Index(space=SPACE, dim=self.dim)
        hnsw.init_index(max_elements=max(64, int(capacity)), M=self.params.M,
                        ef_construction=self.params.ef_construction, random_seed=100,
                        allow_replace_deleted=True)
        hnsw.set_ef(self.params.ef_search)
        return hnsw

    def live_vectors(self, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(labels, vectors) of the live items in label order, ``chunk`` at a time."""
        labels = np.fromiter(sorted(self.items), np.int64, len(self.items))
        for s in range(0, len(labels), chunk):
            yield labels[s:s + chunk], np.asarray(self.hnsw.get_items(labels[s:s + chunk]))

    def compact(self) -> None:
        """Rebuild the graph from the live vectors only (same labels and parameters)."""
        hnsw = self.empty_graph(len(self.items))
        hnsw.set_num_threads(self.hnsw.num_threads)
        for labels, vectors in self.live_vectors():
            hnsw.add_items(vectors, labels)
        self.hnsw = hnsw
        self.unsaved += 1

    # -- filters -------------------------------------------------------------------------------------
    def tag_keys(self) -> set[str]:
        return {k for rec in self.files.values() for k in (rec.get("tags") or {})}

    def labels_where(self, where: filters.Where) -> set[int]:
        """Labels with at least one file matching ``where`` (QueryError for an unknown key)."""
        key = (tuple(sorted(where.items())), self.generation, self.unsaved)
        if key not in self._where_cache:
            filters.check_keys(where, self.tag_keys())
            if len(self._where_cache) >= 16:
                self._where_cache.clear()
            self._where_cache[key] = {int(rec["label"]) for path, rec in self.files.items()
                                      if filters.matches(path, rec, self.roots, where)}
        return self._where_cache[key]

    def paths_where(self, label: int, where: filters.Where | None) -> list[str]:
        paths = self.paths.get(label) or []
        if not where:
            return paths
        return [p for p in paths if filters.matches(p, self.files[p], self.roots, where)]

    # -- search --------------------------------------------------------------------------------------
    def search(self, vector: np.ndarray, k: int, ef: int | None = None,
               allowed: set[int] | None = None) -> list[tuple[int, float]]:
        """Top-k (label, cosine similarity), best first; only ``allowed`` labels when given
        (hnswlib's filter callback, or exact search when few match: ``filters.use_exact``)."""
        k = min(int(k), len(self.items) if allowed is None else len(allowed))
        if k <= 0:
            return []
        q = np.ascontiguousarray(np.asarray(vector, np.float32).reshape(1, -1))
        if q.shape[1] != self.dim or not np.isfinite(q).all():  # never hand hnswlib another size
            raise QueryError(f"a query vector of size {q.shape[1]} (finite: "
                             f"{bool(np.isfinite(q).all())}) for an index of dim {self.dim}")
        if allowed is not None and filters.use_exact(len(allowed), len(self.items), self.dim):
            return self._exact(q[0], k, allowed)
        keep = None if allowed is None else allowed.__contains__
        ef = max(int(ef or self.params.ef_search), k)
        for ef_try in (ef, max(4 * ef, 256), self.hnsw.element_count):
            self.hnsw.set_ef(ef_try)
            try:
                labels, dists = self.hnsw.knn_query(q, k=k, filter=keep)
                break
            except RuntimeError:  # hnswlib found fewer than k (many deleted slots): search wider
                continue
        else:
            return self._exact(q[0], k, allowed)
        return [(int(label), float(1.0 - d)) for label, d in zip(labels[0], dists[0])]

    def _exact(self, q: np.ndarray, k: int, allowed: set[int] | None = None) -> list[tuple[int, float]]:
        among = self.items if allowed is None else allowed
        labels = np.fromiter(among, np.int64, len(among))
        vecs = np.asarray(self.hnsw.get_items(labels), np.float32)
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        scores = vecs @ (q / max(float(np.linalg.norm(q)), 1e-12))
        order = np.argsort(-scores, kind="stable")[:k]
        return [(int(labels[i]), float(scores[i])) for i in order]

    # -- save ----------------------------------------------------------------------------------------
    def meta(self) -> dict:
        root_list, files = roots.split_by_root(self.files, self.roots)
        root_list, skipped = roots.split_by_root(self.skipped, root_list)
        files += [{}] * (len(root_list) - len(files))
        return {
            "format": store.INDEX_FORMAT, "format_version": store.INDEX_FORMAT_VERSION,
            "generation": self.generation, "created": self.created, "updated": self.updated,
            "model": self.model, "space": SPACE, "dim": self.dim, "hnsw": self.params.to_dict(),
            "count": len(self.items), "next_label": self.next_label, "roots": root_list,
            "deleted": self.deleted_labels(),
            "items": {str(label): {"sha256": sha} for label, sha in sorted(self.items.items())},
            "files": [dict(sorted(f.items())) for f in files],
            "skipped": [dict(sorted(f.items())) for f in skipped],
            **({"edges": self.edges.meta()} if self.edges is not None else {}),
        }

    def save(self, index_dir: str | Path) -> str:
        """Commit this state as a new generation (caller holds the writer lock). Returns its name.
        A graph with more than MAX_DELETED_SHARE deleted slots is rebuilt first."""
        if self.deleted_share() > MAX_DELETED_SHARE:
            self.compact()
        def write_files(tmp: Path) -> None:
            self.hnsw.save_index(str(tmp / store.INDEX_FILE))
            if self.edges is not None:
                self.edges.write(tmp, set(self.items))

        name, meta = store.commit(index_dir, meta=self.meta(), after=self.generation,
                                  write_files=write_files)
        self.generation, self.updated = meta["generation"], meta["updated"]
        self.format_version = meta["format_version"]
        self.unsaved = 0
        return name


__all__ = ["GalleryIndex", "HnswParams", "SPACE"]
