"""Parses Prometheus text from stdin with the reference parser (prometheus_client) and prints one JSON object per
sample: name, labels, value, and the family's type. A malformed exposition raises, failing the test."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        print(json.dumps({"family": family.name, "type": family.type, "name": sample.name,
                          "labels": sample.labels, "value": sample.value}))
