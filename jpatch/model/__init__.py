"""The model layer: the pure-functional GPT-2 (gpt2), activation site names (sites, names),
interventions, the TransformerLens-style front door (front, generate, analysis), tokens
(tokenizer, padding) and weights on disk (checkpoint, convert). Imports only jpatch.files."""
