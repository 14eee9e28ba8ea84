"""Small records in the layouts public preference sets publish (the schemas of their dataset cards:
key names, nesting, value types and label meanings; the texts are made up), and the pairs each must
give. Shared by the data tests."""

from __future__ import annotations


def msg(role: str, content: str) -> dict:
    # content before role: the key order of the Arrow schemas these sets are published with
    return {"content": content, "role": role}


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [msg(role, text) for role, text in turns]


SYSTEM = "You are a terse assistant."


def trl_implicit() -> list[dict]:
    """trl-lib/ultrafeedback_binarized, Skywork-Reward-Preference: conversations, no prompt column."""
    return [
        {"chosen": conv(("user", "Name a fruit."), ("assistant", "An apple.")),
         "rejected": conv(("user", "Name a fruit."), ("assistant", "A chair.")), "score_chosen": 8.0,
         "score_rejected": 2.0},
        {"chosen": conv(("system", SYSTEM), ("user", "Hi."), ("assistant", "Hello."), ("user", "Name a colour."),
                        ("assistant", "Blue.")),
         "rejected": conv(("system", SYSTEM), ("user", "Hi."), ("assistant", "Hello."), ("user", "Name a colour."),
                          ("assistant", "Seven.")), "score_chosen": 7.0, "score_rejected": 3.0},
    ]


TRL_IMPLICIT_PAIRS = [
    ("Name a fruit.", "An apple.", "A chair.", None),
    (f"System: {SYSTEM}\n\nUser: Hi.\n\nAssistant: Hello.\n\nUser: Name a colour.", "Blue.", "Seven.",
     [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi."},
      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]),
]


def ultrafeedback_h4() -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized: a prompt text beside whole conversations, plus messages."""
    out = []
    for i, (p, good, bad) in enumerate([("Write a haiku about rain.", "Soft rain on the roof.", "Rain is wet."),
                                        ("What is 2+2?", "4.", "5.")]):
        out.append({"prompt": p, "prompt_id": f"{i:064x}", "chosen": conv(("user", p), ("assistant", good)),
                    "rejected": conv(("user", p), ("assistant", bad)), "messages": conv(("user", p), ("assistant", good)),
                    "score_chosen": 8.0, "score_rejected": 5.0})
    return out


def argilla_ultrafeedback() -> list[dict]:
    """argilla/ultrafeedback-binarized-preferences-cleaned: hyphenated rating/model columns."""
    p = "Explain tides in one sentence."
    return [{"source": "evol_instruct", "prompt": p, "chosen": conv(("user", p), ("assistant", "The moon pulls the sea.")),
             "chosen-rating": 4.75, "chosen-model": "gpt-4",
             "rejected": conv(("user", p), ("assistant", "Fish move water.")), "rejected-rating": 2.5,
             "rejected-model": "alpaca-7b"}]


def orca_dpo_pairs() -> list[dict]:
    """Intel/orca_dpo_pairs: system, question, chosen, rejected, all text (system may be empty)."""
    return [{"system": SYSTEM, "question": "Translate 'cat' to French.", "chosen": "Chat.", "rejected": "Chien."},
            {"system": "", "question": "Is ice cold?", "chosen": "Yes.", "rejected": "No."}]


def shp() -> list[dict]:
    """stanfordnlp/SHP: labels 1 = human_ref_A preferred, 0 = human_ref_B."""
    base = {"domain": "askculinary_train", "upvote_ratio": 0.98, "c_root_id_A": "hkh25sc", "c_root_id_B": "hkh25lp",
            "created_at_utc_A": 1636822112, "created_at_utc_B": 1636822110, "seconds_difference": 2.0}
    return [{**base, "post_id": "qt3nxl", "history": "How long should I rest a steak?", "human_ref_A": "Five minutes.",
             "human_ref_B": "Never rest it.", "labels": 1, "score_A": 340, "score_B": 166, "score_ratio": 2.05},
            {**base, "post_id": "qt3nxm", "history": "Why is my bread dense?", "human_ref_A": "Because.",
             "human_ref_B": "Too little proofing time.", "labels": 0, "score_A": 12, "score_B": 98, "score_ratio": 8.2}]


def pku_saferlhf() -> list[dict]:
    """PKU-Alignment/PKU-SafeRLHF: two labels, better (helpful) and safer (harmless), 0/1 response ids."""
    harm = {"Endangering National Security": False, "Insulting Behavior": False}
    return [{"prompt": "How do I pick a lock?", "response_0": "Use a tension wrench and a pick.",
             "response_1": "I can't help with that.", "prompt_source": "Alpaca3-70B", "response_0_source": "Alpaca-7B",
             "response_1_source": "Alpaca-7B", "is_response_0_safe": False, "is_response_1_safe": True,
             "response_0_harm_category": harm, "response_1_harm_category": harm, "response_0_severity_level": 1,
             "response_1_severity_level": 0, "better_response_id": 0, "safer_response_id": 1,
             "response_0_sha256": "40cb", "response_1_sha256": "9c09"},
            {"prompt": "Recommend a book.", "response_0": "Read nothing.", "response_1": "Try 'Dune'.",
             "prompt_source": "Alpaca3-70B", "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B",
             "is_response_0_safe": True, "is_response_1_safe": True, "response_0_harm_category": harm,
             "response_1_harm_category": harm, "response_0_severity_level": 0, "response_1_severity_level": 0,
             "better_response_id": 1, "safer_response_id": 1, "response_0_sha256": "aa", "response_1_sha256": "bb"}]


def helpsteer2() -> list[dict]:
    """nvidia/HelpSteer2 preference: preference_strength -3..3, negative = response_1 better, 0 a tie."""
    def row(p, r1, r2, strength):
        return {"split": "train", "prompt": p, "response_1": r1, "response_2": r2, "preference_strength": strength,
                "preference_statement": "@Response 2 is better", "preference_elaboration": "...",
                "three_most_similar_preferences": [{"statement": "s", "elaboration": "e", "strength": strength}],
                "all_preferences_unprocessed": [{"strength": strength, "justification": "j"}]}
    return [row("Define entropy.", "Disorder, roughly.", "A kind of cheese.", -2),
            row("Capital of Peru?", "Quito.", "Lima.", 3),
            row("Say hi.", "Hi.", "Hello.", 0)]


def helpsteer3() -> list[dict]:
    """nvidia/HelpSteer3 preference: context as messages, overall_preference -3..3 (negative = response1)."""
    ctx = [{"role": "user", "content": "Write a loop in Python."}, {"role": "assistant", "content": "for i in x: ..."},
           {"role": "user", "content": "Now in JavaScript."}]
    return [{"domain": "code", "language": "javascript_html_css", "context": ctx,
             "response1": "for (const i of x) {}", "response2": "Use a goto.", "overall_preference": -1,
             "individual_preference": [{"score": -1, "reasoning": "@Response 1 is slightly better"}]},
            {"domain": "general", "language": "english", "context": [{"role": "user", "content": "Hi!"}],
             "response1": "Hello.", "response2": "Hello!", "overall_preference": 0,
             "individual_preference": [{"score": 0, "reasoning": "same"}]}]


def nectar() -> list[dict]:
    """berkeley-nest/Nectar: an HH transcript prompt, 7 answers ranked (rank 1 best, floats)."""
    answers = [{"answer": f"Answer ranked {r}.", "model": f"model-{r}", "rank": float(r)} for r in (3, 1, 7, 2, 5, 4, 6)]
    tie = [{"answer": "Yes.", "model": "a", "rank": 1.0}, {"answer": "Sure.", "model": "b", "rank": 1.0},
           {"answer": "No.", "model": "c", "rank": 2.0}]
    return [{"prompt": "\n\nHuman: What is 2+2?\n\nAssistant: ", "answers": answers, "turns": 1, "num_responses": 7,
             "source": ["lmsys-chat-1m"], "good_natured": True},
            {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Can you help?\n\nAssistant: ", "answers": tie,
             "turns": 2, "num_responses": 3, "source": ["anthropic-hh"], "good_natured": True}]


def ultrafeedback_raw() -> list[dict]:
    """openbmb/UltraFeedback: completions with an overall_score (higher is better)."""
    def completion(model, text, score):
        return {"model": model, "principle": "helpfulness", "custom_system_prompt": "", "response": text,
                "annotations": {"honesty": {"Rating": "5", "Rationale": "..."}}, "critique": "...",
                "overall_score": score, "fine-grained_score": score / 2}
    return [{"source": "sharegpt", "instruction": "Name a planet.", "models": ["a", "b", "c", "d"],
             "correct_answers": ["None"], "incorrect_answers": ["None"],
             "completions": [completion("a", "Mars.", 8.5), completion("b", "The sun.", 3.0),
                             completion("c", "Jupiter.", 8.5), completion("d", "Pluto?", 6.0)]}]


def chatbot_arena() -> list[dict]:
    """lmsys/chatbot_arena_conversations: winner model_a / model_b / tie / tie (bothbad)."""
    def battle(winner, a, b, turn=1):
        return {"question_id": f"q-{winner}-{turn}", "model_a": "chatglm-6b", "model_b": "koala-13b", "winner": winner,
                "judge": "arena_user_973", "conversation_a": a, "conversation_b": b, "turn": turn, "anony": True,
                "language": "English", "tstamp": 1682351591.1322,
                "openai_moderation": {"categories": {"harassment": False}, "flagged": False},
                "toxic_chat_tag": {"roberta-large": {"flagged": False, "probability": 0.008}}}
    q = ("user", "Tell me a joke.")
    return [battle("model_a", conv(q, ("assistant", "Why did the chicken...")), conv(q, ("assistant", "No."))),
            battle("model_b", conv(q, ("assistant", "Jokes are bad.")), conv(q, ("assistant", "Knock knock."))),
            battle("tie", conv(q, ("assistant", "Ha.")), conv(q, ("assistant", "Heh."))),
            battle("tie (bothbad)", conv(q, ("assistant", "...")), conv(q, ("assistant", "?"))),
            # two turns, the first answers differ: two different conversations, not a pair
            battle("model_a", conv(("user", "Hi"), ("assistant", "Hello"), ("user", "Joke?"), ("assistant", "Pun.")),
                   conv(("user", "Hi"), ("assistant", "Yo"), ("user", "Joke?"), ("assistant", "No.")), turn=2)]


def ultrachat() -> list[dict]:
    """HuggingFaceH4/ultrachat_200k: prompt + messages ending in the assistant's answer."""
    return [{"prompt": "Plan a trip to Rome.", "prompt_id": "ab",
             "messages": conv(("user", "Plan a trip to Rome."), ("assistant", "Day 1: ..."), ("user", "Cheaper?"),
                              ("assistant", "Stay in hostels."))},
            {"prompt": "Explain rust.", "prompt_id": "cd",
             "messages": conv(("user", "Explain rust."), ("assistant", "Iron oxide..."))}]
