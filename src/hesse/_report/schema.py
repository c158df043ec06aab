"""The JSON Schema of ``report.json`` (``hesse analyze --report``): data only, so the public
package can export it without importing the report's computation or matplotlib."""

from __future__ import annotations

from typing import Any

__all__ = ["REPORT_SCHEMA"]

_num = {"type": "number"}
_nums = {"type": "array", "items": _num}
_matrix = {"type": "array", "items": _nums}

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
        "landscape",
        "figures",
        "seconds",
    ],
    "properties": {
        "version": {"type": "integer", "const": 1},
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
            "required": ["grid", "density", "sigma", "num_probes", "lanczos_steps"],
            "properties": {
                "grid": _nums,
                "density": _nums,
                "sigma": _num,
                "num_probes": {"type": "integer"},
                "lanczos_steps": {"type": "integer"},
            },
        },
        "histogram": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["edges", "counts", "source"],
                    "properties": {
                        "edges": _nums,
                        "counts": {"type": "array", "items": {"type": "integer"}},
                        "source": {"enum": ["dense", "chain", "gram"]},
                    },
                },
            ]
        },
        "blocks": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["layers", "hessian", "ggn", "residual"],
                    "properties": {
                        "layers": {"type": "array", "items": {"type": "string"}},
                        "hessian": _matrix,
                        "ggn": _matrix,
                        "residual": _matrix,
                    },
                },
            ]
        },
        "landscape": {
            "type": "object",
            "required": ["alphas", "losses", "quadratic"],
            "properties": {"alphas": _nums, "losses": _nums, "quadratic": _nums},
        },
        "figures": {"type": "array", "items": {"type": "string", "pattern": r"^[\w.-]+\.png$"}},
        "seconds": _num,
    },
}
