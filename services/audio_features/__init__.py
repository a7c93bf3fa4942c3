"""AudioFeatures: a bounded audio window -> 512-d features per video frame (stateless)."""
