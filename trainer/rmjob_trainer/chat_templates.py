"""Chat templates selectable by name with ``--chat_template`` (torch-free, so the CLI can
validate the name before importing anything heavy).

The first two are exactly the strings open-instruct documents for reward modeling; ``tulu``
and ``zephyr`` are the well-known templates of those model families. ``--chat_template
tokenizer`` keeps the template that ships with the tokenizer instead.
"""

TOKENIZER_TEMPLATE = "tokenizer"

CHAT_TEMPLATES: dict[str, str] = {
    # "This is really an amazing thing. I am glad you said that.<|endoftext|>"
    "simple_concat_with_space": (
        "{% for message in messages %}{{' ' if not loop.first else ''}}"
        "{{message['content']}}{% endfor %}{{eos_token}}"
    ),
    "simple_concat_with_new_line": (
        "{% for message in messages %}{{'\n' if not loop.first else ''}}"
        "{{message['content']}}{% endfor %}{{eos_token}}"
    ),
    # "User: This is really an amazing thing.\n\nAssistant: I am glad you said that.<|endoftext|>"
    "simple_chat": (
        "{% for message in messages %}{{'\n\n' if not loop.first else ''}}"
        "{{message['role']|capitalize + ': ' +message['content']}}{% endfor %}{{eos_token}}"
    ),
    "zephyr": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '<|user|>\n' + message['content'] + eos_token }}"
        "{% elif message['role'] == 'system' %}"
        "{{ '<|system|>\n' + message['content'] + eos_token }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '<|assistant|>\n'  + message['content'] + eos_token }}"
        "{% endif %}"
        "{% if loop.last and add_generation_prompt %}"
        "{{ '<|assistant|>' }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    "tulu": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{{ '<|system|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ '<|user|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{% if not loop.last %}"
        "{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
        "{% else %}"
        "{{ '<|assistant|>\n'  + message['content'] + eos_token }}"
        "{% endif %}"
        "{% endif %}"
        "{% if loop.last and add_generation_prompt %}"
        "{{ '<|assistant|>\n' }}"
        "{% endif %}"
        "{% endfor %}"
    ),
}

CHAT_TEMPLATE_NAMES = (*CHAT_TEMPLATES, TOKENIZER_TEMPLATE)
