#!/usr/bin/env python3
"""What the Kubernetes files give a flashsale container, rendered for this machine.

  k8s_env.py render <manifest> <out-dir> --fill SECRET --host pgbouncer=N ...
      Writes <out-dir>/config/{default,production}.toml (the image's default.toml, the
      ConfigMap's production.toml) and <out-dir>/env (one KEY=VALUE per line): the
      Secret's keys (its REPLACE placeholders filled with SECRET) and the container's own
      `env`. Data-tier hosts (`<service>.flashsale-data:<port>`) become 127.0.0.1, on the
      port given for the service's first word (`pgbouncer-shard-0` -> pgbouncer; unmapped
      ports stay). Nothing else is changed.

  k8s_env.py check-vars
      Fails when a manifest gives a flashsale container a variable the binary reads
      nowhere: it reads FLASHSALE_ENV and FLASHSALE__* (the configuration; an unknown key
      fails its start, which the rendered test proves) and nothing else.
"""
import argparse
import glob
import os
import re
import sys

import yaml

K8S = os.path.join(os.path.dirname(__file__), "..", "k8s")
CONFIG = os.path.join(os.path.dirname(__file__), "..", "config")
DATA_HOST = re.compile(r"([a-z0-9]+)[a-z0-9.-]*\.flashsale-data:(\d+)")
PLACEHOLDER = re.compile(r"REPLACE[\w-]*")
READ = re.compile(r"^(FLASHSALE_ENV|FLASHSALE__[A-Z0-9_]+)$")


def documents(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def manifest(kind, name):
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        for doc in documents(path):
            if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc
    sys.exit(f"no {kind} {name} in k8s/")


def flashsale_containers():
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        for doc in documents(path):
            spec = doc.get("spec", {})
            pod = spec.get("template", spec.get("jobTemplate", {}).get("spec", {}).get("template", {}))
            for container in pod.get("spec", {}).get("containers", []):
                if container.get("image", "").startswith("flashsale"):
                    yield os.path.basename(path), container


def container_env(container, fill):
    env = {}
    for source in container.get("envFrom", []):
        secret = manifest("Secret", source["secretRef"]["name"])
        for key, value in secret.get("stringData", {}).items():
            env[key] = PLACEHOLDER.sub(fill, str(value))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            # A field of the pod (its name): a stand-in.
            env[var["name"]] = "k8s-env-test"
    return env


def localize(text, ports):
    return DATA_HOST.sub(lambda m: f"127.0.0.1:{ports.get(m.group(1), m.group(2))}", text)


def render(args):
    ports = dict(h.split("=", 1) for h in args.host)
    containers = [c for f, c in flashsale_containers() if f == args.manifest]
    if not containers:
        sys.exit(f"no flashsale container in k8s/{args.manifest}")
    config = os.path.join(args.out, "config")
    os.makedirs(config, exist_ok=True)
    with open(os.path.join(CONFIG, "default.toml")) as f:
        default = f.read()
    with open(os.path.join(config, "default.toml"), "w") as f:
        f.write(default)
    production = manifest("ConfigMap", "flashsale-config")["data"]["production.toml"]
    with open(os.path.join(config, "production.toml"), "w") as f:
        f.write(localize(production, ports))
    with open(os.path.join(args.out, "env"), "w") as f:
        for key, value in container_env(containers[0], args.fill).items():
            f.write(f"{key}={localize(value, ports)}\n")


def check_vars(_args):
    unread = sorted(
        {(f, key) for f, c in flashsale_containers() for key in container_env(c, "x") if not READ.match(key)}
    )
    for path, key in unread:
        print(f"k8s/{path}: {key} is set but flashsale reads no such variable", file=sys.stderr)
    sys.exit(1 if unread else 0)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(required=True)
    r = sub.add_parser("render")
    r.add_argument("manifest")
    r.add_argument("out")
    r.add_argument("--fill", required=True)
    r.add_argument("--host", action="append", default=[])
    r.set_defaults(run=render)
    sub.add_parser("check-vars").set_defaults(run=check_vars)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
