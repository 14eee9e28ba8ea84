"""The chat template a policy uses, the same in training and in serving.

Models ship templates that refuse what data holds: Gemma 2's and Mistral's raise on a `system`
message, base models (Pythia, GPT-2) have none. :func:`template_for` gives the template to use: the
user's (`policy.chat_template`), else the tokenizer's, else :data:`PLAIN_TEMPLATE`; and when that
template refuses a system message and `policy.fold_system` is on, the same template behind
:data:`FOLD_SYSTEM`, which puts the system text before the first user turn's (as Gemma 3's own template
does): the instruction still reaches the model, in the one place the template accepts it. The result
is a template string, so the served model needs no code of this package to render alike: the registry
hands it the string.
"""

from __future__ import annotations

from jinja2.exceptions import TemplateError

PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""The prompt format of a model that has no chat template: ``System: ...\\n\\nUser: ...\\n\\nAssistant:``
(the turns as the reward model reads them), ending where the answer starts."""

FOLD_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' and messages | length > 1"
    " and messages[1]['role'] == 'user' -%}"
    "{%- set messages = [{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[1]['content']}]"
    " + messages[2:] -%}"
    "{%- endif -%}"
)
"""A preamble that turns a leading system message into the start of the first user turn."""

_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


class ChatTemplateError(ValueError):
    """The chat template refuses a conversation; the message says which and how to fix it."""


def refuses_system(tokenizer, template: str) -> bool:
    """Whether `template` raises on a system message followed by a user turn."""
    try:
        tokenizer.apply_chat_template(_PROBE, chat_template=template, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return True
    return False


def template_for(tokenizer, override: str = "", fold: bool = True) -> str:
    """The chat template the policy uses with this tokenizer (see the module docstring)."""
    template = override or tokenizer.chat_template or PLAIN_TEMPLATE
    if isinstance(template, dict):  # named templates (a tool-use one beside the chat one): the chat one
        template = template.get("default") or next(iter(template.values()))
    if fold and refuses_system(tokenizer, template):
        return FOLD_SYSTEM + template
    return template


def folds_system(template: str) -> bool:
    """Whether `template` (from :func:`template_for`) folds system messages into the first user turn."""
    return template.startswith(FOLD_SYSTEM)


def render(tokenizer, messages: list[dict]) -> str:
    """The conversation in the tokenizer's chat template with the generation prompt; a refusal raises
    :class:`ChatTemplateError` that names it and what to set."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:
        roles = [m["role"] for m in messages]
        fold = "policy.fold_system: true puts a system message into the first user turn; " \
            if "system" in roles and not folds_system(tokenizer.chat_template or "") else ""
        raise ChatTemplateError(f"the model's chat template refuses a conversation with roles {roles}: {exc} "
                                f"({fold}give a template that accepts it in policy.chat_template, or change the "
                                "data)") from None
