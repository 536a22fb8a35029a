"""The offline trainer: the one part of ``dictionaries`` that reads activations through
``editing`` (model loading, hook layer, corpora). The SAE, format and store modules import
nothing from here."""
