"""benchmarks/realdata.py: the wiki markup stripper keeps the prose and drops the markup
(the loaders themselves need the optional `.[models]` extra and are exercised by the benchmark)."""

from benchmarks.realdata import strip_wiki


def test_strip_wiki_keeps_text_and_link_labels():
    """Templates (nested), tables, refs, comments, files and categories go; links keep their label."""
    text = ("{{Infobox|name={{nested|x}}}}'''Anarchism''' is a [[political philosophy]] that "
            "[[Advocacy|advocates]] self-governed societies.<ref>Cite {{x}}</ref><!-- note -->\n"
            "{| class=wikitable\n|-\n| cell\n|}\n\n\n\nSee [http://example.org the site] and "
            "[[File:A.png|thumb|a [[caption]]]].[[Category:Political ideologies]] &amp; more")
    out = strip_wiki(text)
    assert out.startswith("Anarchism is a political philosophy that advocates self-governed societies.")
    assert "See the site and ." in out and "& more" in out
    for junk in ("{{", "}}", "[[", "]]", "<ref", "cell", "note", "Category", "'''", "\n\n\n"):
        assert junk not in out


def test_packed_calibration_has_no_padding():
    """MiniLM calibration: running text packed into [CLS] ... [SEP] rows, masks all ones."""
    import pytest
    import torch

    from benchmarks.accuracy import packed_calibration

    class Tok:
        cls_token_id, sep_token_id = 101, 102

        def __call__(self, s, add_special_tokens=False):
            return {"input_ids": [1000 + len(w) for w in s.split()]}

    batches = packed_calibration(Tok(), ["a bb ccc dddd"] * 20, count=5, length=8, batch=2)
    ids = torch.cat([b[0] for b in batches])
    assert ids.shape == (5, 8) and all(bool(b[1].all()) for b in batches)
    assert (ids[:, 0] == 101).all() and (ids[:, -1] == 102).all()
    assert ids[0, 1:7].tolist() == [1001, 1002, 1003, 1004, 1001, 1002]  # text continues, no pads
    with pytest.raises(ValueError, match="need 60"):
        packed_calibration(Tok(), ["a"] * 3, count=10, length=8)
