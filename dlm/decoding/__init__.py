"""Decoding: the KV-cached parallel decoder, the AR baseline, text in / text out."""
