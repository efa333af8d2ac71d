"""Faces, below methods and metrics: detection (MTCNN), ArcFace alignment and embeddings, pixel memos.

Methods (identity adapters that condition on ArcFace embeddings, landmark ControlNets) and metrics
(face detection, identity similarity, head control) and models (DECA's crop) all need the same face
of an image; they share these modules instead of importing each other.
"""
