from circot.prompts import EMB_TOKEN, CoT, format_cot, parse_cot, query_instruction


def test_round_trip():
    cot = CoT(caption="a red circle", reasoning="change red to blue", conclusion="a blue circle")
    text = format_cot(cot)
    assert text.endswith(EMB_TOKEN)
    parsed = parse_cot(text, require_emb=True)
    assert parsed.well_formed and parsed.problems == []
    assert (parsed.caption, parsed.reasoning, parsed.conclusion) == (
        cot.caption,
        cot.reasoning,
        cot.conclusion,
    )


def test_truncated_output_is_flagged_not_raised():
    parsed = parse_cot("<caption>a red circle</caption><reasoning>change the col")
    assert not parsed.well_formed
    assert parsed.caption == "a red circle"
    assert parsed.reasoning == "change the col"
    assert parsed.conclusion == ""
    assert "unclosed <reasoning>" in parsed.problems and "missing <conclusion>" in parsed.problems


def test_missing_emb_only_matters_when_required():
    text = format_cot(CoT(caption="a", reasoning="b", conclusion="c"), with_emb=False)
    assert parse_cot(text).well_formed
    assert parse_cot(text, require_emb=True).problems == ["no <emb>"]


def test_garbage_never_raises():
    for junk in ["", "<emb>", "</caption><caption>", "<conclusion>x</conclusion><caption>y", "<|im_end|>"]:
        parsed = parse_cot(junk)
        assert isinstance(parsed, CoT)
        assert not parsed.well_formed


def test_query_instruction_modes():
    assert "make it blue" in query_instruction(" make it blue ", "full")
    assert query_instruction("x", "fast") != query_instruction("x", "full")
