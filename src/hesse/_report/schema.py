"""The JSON Schema of ``report.json`` (``hesse analyze --report``): data only, so the public
package can export it without importing the report's computation or matplotlib."""

from __future__ import annotations

from typing import Any

__all__ = ["REPORT_SCHEMA"]

_num = {"type": "number"}
_nums = {"type": "array", "items": _num}
_matrix = {"type": "array", "items": _nums}
_ints = {"type": "array", "items": {"type": "integer"}}
_strings = {"type": "array", "items": {"type": "string"}}
_bool_matrix = {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}}}
_text = {"type": "string", "minLength": 1}
_side = {
    "type": "object",
    "required": ["edges", "counts"],
    "properties": {"edges": _nums, "counts": _ints},
}
_symlog = {
    "type": "object",
    "required": ["linthresh", "negative", "positive", "num_negative", "num_zero", "num_positive"],
    "properties": {
        "linthresh": {"type": "number", "exclusiveMinimum": 0},
        "negative": _side,  # edges of |lambda| for the negative eigenvalues
        "positive": _side,
        "num_negative": {"type": "integer", "minimum": 0},
        "num_zero": {"type": "integer", "minimum": 0},
        "num_positive": {"type": "integer", "minimum": 0},
    },
}

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "hesse analysis report",
    "type": "object",
    "required": [
        "version",
        "model",
        "num_params",
        "num_samples",
        "dtype",
        "loss",
        "grad_norm",
        "top_eigenvalues",
        "smallest_eigenvalue",
        "trace",
        "density",
        "histogram",
        "blocks",
        "hessian_image",
        "landscape",
        "figures",
        "seconds",
    ],
    "properties": {
        "version": {"type": "integer", "const": 2},
        "model": {"type": "string"},
        "num_params": {"type": "integer", "minimum": 1},
        "num_samples": {"type": "integer", "minimum": 1},
        "dtype": {"type": "string"},
        "loss": _num,
        "grad_norm": {"type": "number", "minimum": 0},
        "top_eigenvalues": {
            "type": "object",
            "required": ["values", "residuals", "num_products", "dense"],
            "properties": {
                "values": _nums,
                "residuals": _nums,
                "num_products": {"type": "integer"},
                "dense": {"oneOf": [_nums, {"type": "null"}]},
            },
        },
        "smallest_eigenvalue": _num,
        "trace": {
            "type": "object",
            "required": ["estimate", "std_error", "method", "num_products"],
            "properties": {
                "estimate": _num,
                "std_error": _num,
                "method": {"enum": ["exact", "hutch++", "hutchinson"]},
                "num_products": {"type": "integer"},
            },
        },
        "density": {
            "type": "object",
            "required": ["grid", "density", "sigma", "method", "num_probes", "lanczos_steps"],
            "properties": {
                "grid": _nums,
                "density": _nums,
                "sigma": _num,
                "method": {"enum": ["exact", "slq"]},
                "num_probes": {"type": "integer"},
                "lanczos_steps": {"type": "integer"},
            },
        },
        "histogram": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["edges", "counts", "source", "symlog"],
                    "properties": {
                        "edges": _nums,
                        "counts": _ints,
                        "source": {"enum": ["dense", "chain", "gram"]},
                        "symlog": {"oneOf": [{"type": "null"}, _symlog]},
                    },
                },
            ]
        },
        "blocks": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["tensors", "sizes", "hessian", "ggn", "residual", "exact_zero"],
                    "properties": {
                        "tensors": _strings,
                        "sizes": _ints,
                        "hessian": _matrix,
                        "ggn": _matrix,
                        "residual": _matrix,
                        "exact_zero": {
                            "type": "object",
                            "required": ["hessian", "ggn", "residual"],
                            "additionalProperties": _bool_matrix,
                        },
                    },
                },
            ]
        },
        "hessian_image": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["cells", "tensors", "boundaries", "num_params"],
                    "properties": {
                        "cells": _matrix,
                        "tensors": _strings,
                        "boundaries": _nums,
                        "num_params": {"type": "integer", "minimum": 1},
                    },
                },
            ]
        },
        "landscape": {
            "type": "object",
            "required": ["alphas", "losses", "quadratic"],
            "properties": {"alphas": _nums, "losses": _nums, "quadratic": _nums},
        },
        "figures": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["file", "title", "x_label", "y_label", "caption"],
                "properties": {
                    "file": {"type": "string", "pattern": r"^[\w.-]+\.png$"},
                    "title": _text,
                    "x_label": _text,
                    "y_label": _text,
                    "caption": _text,
                },
            },
        },
        "seconds": _num,
    },
}
