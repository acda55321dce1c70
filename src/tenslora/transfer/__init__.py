"""Adapters between forms: exact export to a PEFT LoRA, fitting to a trained LoRA, compression."""
