"""Explanations that are measured: Captum attribution maps (`methods`), their quality (`scores`),
figures (`figures`), the DVC stage (`python -m psyface.explain`) and `psyface explain` (`cli`)."""
