"""Backbone cards: one TOML file per backbone (installed as featx.cards)."""
