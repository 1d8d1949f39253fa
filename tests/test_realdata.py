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
