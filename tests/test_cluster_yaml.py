"""cluster.yaml is a valid Ray cluster-launcher config (the schema Ray itself ships)."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] > 0  # autoscaling GPU pool
    # the image (deploy/Dockerfile: this Ray, a CUDA torch, the project), boot commands and
    # node credentials: tests/test_deploy.py
