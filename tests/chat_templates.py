"""A chat template in the shape Gemma 2 ships (shared by the chat and registry tests)."""

# Gemma 2's template in substance: no system role, <start_of_turn>/<end_of_turn> turns, `model` for the assistant.
GEMMA = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
