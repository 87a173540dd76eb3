import torch

from dynsplit_sglang.core import candidate_mask, candidates_for, mask_from_texts


def test_punct_mode_marks_punctuation_newlines_and_code_closers():
    texts = ["Hello", ".", "Ġworld", "Ċ", ");", "}", "ĠThe", None, "?", "ĠĠĠ"]
    mask = mask_from_texts(texts, "punct").tolist()
    assert mask == [False, True, False, True, True, True, False, False, True, False]


def test_sentence_mode_is_the_fixed_predefined_set():
    texts = [".", ",", ")", "Ċ", "!"]
    assert mask_from_texts(texts, "sentence").tolist() == [True, False, False, True, True]


def test_all_mode_makes_every_token_a_candidate():
    assert mask_from_texts(["a", "b", None], "all").all()


def test_tokenizer_without_punctuation_gives_no_candidates():
    class Tok:
        all_special_ids = [0]

        def __len__(self):
            return 4

        def convert_ids_to_tokens(self, ids):
            return ["<s>", "ab", "cd", "ef"][: len(ids)]

    assert not candidate_mask(Tok(), "punct").any()
    assert candidate_mask(Tok(), "all").all()


def test_candidates_for_maps_ids_and_ignores_out_of_vocab():
    vm = torch.tensor([False, True, False])
    ids = torch.tensor([0, 1, 2, 1, 7, -1])
    assert candidates_for(ids, vm).tolist() == [False, True, False, True, False, False]
