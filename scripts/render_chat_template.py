#!/usr/bin/env python3
"""Renders chat templates with Python's jinja2 the way Hugging Face transformers does.

The reference for edgelm-chat (tests/chat_template.rs): the environment is built like
transformers' `_compile_jinja_template` and rendered like its `render_jinja_template`.

stdin: a JSON list of jobs
    {"template": str, "bos_token": str, "eos_token": str,
     "messages": [...], "tools": [...] | null, "add_generation_prompt": bool}
stdout: {"jinja2": version, "results": [...]} with, per job, {"text": str} or
    {"error": str, "type": exception class name, "raised": true if raise_exception() raised it}
"""

import json
import sys
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class RaisedByTemplate(TemplateError):
    """What raise_exception() raises: still a TemplateError, as in transformers."""


class Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}` tag; without the assistant-mask tracker it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def raise_exception(message):
    raise RaisedByTemplate(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces jinja's HTML-escaping tojson with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


def compile_template(source):
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def run(job):
    try:
        template = compile_template(job["template"])
        text = template.render(
            messages=job["messages"],
            tools=job.get("tools"),
            documents=None,
            add_generation_prompt=job["add_generation_prompt"],
            bos_token=job["bos_token"],
            eos_token=job["eos_token"],
        )
        return {"text": text}
    except Exception as e:  # any failure, as apply_chat_template would propagate it
        return {"error": str(e), "type": type(e).__name__, "raised": isinstance(e, RaisedByTemplate)}


def main():
    jobs = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    results = [run(job) for job in jobs]
    sys.stdout.write(json.dumps({"jinja2": jinja2.__version__, "results": results}))


if __name__ == "__main__":
    main()
