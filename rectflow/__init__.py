"""rectflow: rectified-flow transformers (SD3)."""
