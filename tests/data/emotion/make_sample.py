"""Rebuild en.tsv and zh.tsv of the emotion evaluation set from the public sources (see SOURCES.md).

    python make_sample.py --goemotions TEST_TSV DEV_TSV --goemotions-extra TRAIN_TSV --smp SMP_JSON [--out DIR]

TEST_TSV, DEV_TSV, TRAIN_TSV: GoEmotions test.tsv, dev.tsv and train.tsv (text<TAB>comma-separated
emotion ids<TAB>comment id, no header). Rows come from test + dev; a label whose test + dev rows run
out before N rows are kept (surprise) continues with train.tsv rows, in their own fixed-seed order.
SMP_JSON: SMP2020-EWECT usual_test_labeled.txt (a JSON list of {"id", "content", "label"}).

Deterministic: a fixed-seed shuffle of each label's pool, rows listed in DROP_EN / DROP_ZH skipped
(read by hand and rejected, reasons above those lists), the first N kept; the output order is a
fixed-seed shuffle.
Standard library only.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import re
from pathlib import Path

SEED = 20240613
N_PER_LABEL = 60
LABELS = ("joy", "sadness", "anger", "fear", "surprise", "neutral")

# GoEmotions ids are indexes into this list (emotions.txt of the release).
GOEMOTIONS_NAMES = (
    "admiration amusement anger annoyance approval caring confusion curiosity desire disappointment "
    "disapproval disgust embarrassment excitement fear gratitude grief joy love nervousness optimism "
    "pride realization relief remorse sadness surprise neutral"
).split()

# Only rows with exactly one GoEmotions label are used; that label maps to ours. Labels not listed
# here (admiration, approval, caring, confusion, curiosity, desire, disapproval, disgust,
# embarrassment, gratitude, love, optimism, realization) are dropped: their texts are not clearly
# one of our six emotions (see SOURCES.md).
GOEMOTIONS_MAP = {
    "joy": "joy", "amusement": "joy", "excitement": "joy", "relief": "joy", "pride": "joy",
    "sadness": "sadness", "grief": "sadness", "disappointment": "sadness", "remorse": "sadness",
    "anger": "anger", "annoyance": "anger",
    "fear": "fear", "nervousness": "fear",
    "surprise": "surprise",
    "neutral": "neutral",
}

SMP_MAP = {"happy": "joy", "sad": "sadness", "angry": "anger", "fear": "fear",
           "surprise": "surprise", "neutral": "neutral"}

# Rows read, in sampling order, and dropped (GoEmotions comment ids; SMP2020 row ids): the gold label
# is not what a reader sees in the text alone (sarcasm, needs the thread, a greeting or advice, another
# emotion dominates), the text is a news headline, an advert, classical verse or a near-duplicate of a
# kept row, or it is a slur aimed at a group. Reading stopped at each label's 60th kept row.
DROP_EN = frozenset("""
eczegcw eczf1y3 eczg2g7 eczghwg eczh6mi eczji6u eczw7wb ed00e3l ed00f1z ed038bu ed05nzi ed075k7
ed0cmts ed0czpp ed0i4fk ed0it1e ed0iuo8 ed0svk4 ed0vap0 ed0w0bg ed0yfl4 ed10iw1 ed1i50s ed1k0vz
ed1p5dh ed1uwg6 ed1wud5 ed1xr1s ed1z5be ed1zmai ed26xgi ed270uf ed28a5k ed2e00i ed2fg67 ed2hvlf
ed30q3l ed33xnp ed38erp ed3cx2l ed3g2zc ed3h3xi ed3mf1l ed3ngv7 ed3os3q ed3p9im ed3yi2i ed3zxzg
ed48aqg ed48krv ed4e0bz ed4py2j ed4q326 ed4tgj7 ed4wohn ed4yr9r ed53qtu ed54njm ed57vmw ed5gjn6
ed5hvpa ed5y6kk ed6918c ed6bwbj ed6f451 ed6gw3e ed6myuv ed6pkzv ed6rodh ed6tecx ed6vcfh ed6wsm0
ed6xfs0 ed75h49 ed79lko ed7ccmu ed7lqu4 ed7pf30 ed7rdog ed7t8y6 ed7x62x ed7xh5l ed7yj4s ed84cls
ed8elm4 ed8ja96 ed8o0za ed8sxt5 ed8t0es ed8urm9 ed8vuhz ed8yt80 ed936ao ed96j9t ed99kw8 ed9cf9h
ed9gxkj ed9h1fn ed9y68k eda5d0q eda5raz edabf13 edabm5a edaeja3 edafb8b edahxv0 edatjcr edb0t57
edb9w17 edbc8d6 edbhns9 edbo4lx edbopoo edbtngo edbufq5 edc4l1j edc6whb edc8vp2 edcc66r edcid6m
edckh6b edckiqb edckk2f edclxfh edcqmf1 edcxlpz edd09ir edd50m4 eddiml0 eddjzwg ede7csf edenhhr
edeutkm edewa7g edf74ta edf9nth edfb09i edfebf0 edff0vj edfmk6s edftl0o edfus2d edfx3j5 edfx8ym
edgy388 edhj78h edho03w edhvqgi edhw91l edhxllk edhzgg4 edi7yht edi86iy edie3y0 edig1al edigf2t
edinn3n ediuzg2 edizgxh edj0icd edj2w4y edj4q2f edj6bdj edjaucb edjd969 edje3s2 edjilrb edjiuwg
edjmw3k edjolab edjst8s edjw0pb edjycdd edk08kd edk5o03 edk6gbr edk98na edka83g edkguai edkil4s
edknc2v edkpg8o edkpjxg edkpvfm edkqj5w edktecd edktuuk edku47p edkwgf6 edkxarr edl27ai edl43g4
edl6kza edl9pqt edle31y edlnuv8 edlp66i edlyqkr edlzkq1 edm0eak edm3dtg edm3gzx edm9hzq edmjk91
edmvj3r edna4oz edncf9f edndst3 ednf8zd edng1aq edni2jh ednkk2n ednn5bp ednobom ednzonf edoa8hc
edoifzo edostdm edp0k2q edp5bb3 edp5e4b edp7v0u edp9hn5 edp9uoq edpgjsw edph4ed edpiohy edpja5m
edptio1 edq2uz8 edq4hsh edq51n7 edq6lly edq7ml5 edqdn8p edqepqg edqg12x edqjwbn edqxehq edr3rqh
edrb24b edrb30t edrc8re edrfvyo edrs2fe edrur8t edrv1m4 eds5juy edscfnz edsxrva edt81gk edtao5v
edtkad3 edtkqat edu6av8 edu6dl8 eduhdh0 edujai9 edukeas eduyvb4 edv0o73 edv2gbm edv6jlh edvazb4
edvbkon edvd348 edvdy44 edvnv86 edvznox edwp8d6 edwuq9t edwvkfi edwyk22 edx1m4z edx8ti9 edxe17g
edxoipc edxwle1 edxy4ze edxysbg edy460m edy8htv edya76e edyh31u edyi8ik edyxe6p edyzi8t edz86do
edzh5rz edzi2qw edzk8qa edzmkbp edzmwzv ee03xu0 ee05w1z ee09f9k ee0jjkm ee0k6ng ee0n3fh ee0ug24
ee0v40x ee0wuyn ee0zpdx ee17nw4 ee18h2k ee1a9hm ee1fnks ee1jc10 ee1nqb6 ee1otog ee1rkwi ee1sfpt
ee1u7av ee1z4ot ee21vqz ee2bd7a ee2hhgz ee2ixyf ee2lp3m ee2miso ee2ofju ee2t4ek ee2ybxe ee2yge0
ee2zm4w ee31b75 ee31lvf ee3icov ee3pa8o ee45v47 ee48sp2 ee4buzn ee4dobv ee4gdcl ee4jiu6 ee4nerr
ee4xci5 ee5ede3 ee5j4gf ee5lizb ee5lxms ee5pbih ee5po5f ee5pu6m ee5y67v ee5zb5a ee60k0m ee631oa
ee63efc ee65l8p ee67318 ee68h6r ee69cgm ee6eyoy ee6j2zd ee6o1mk ee6o8y9 ee6r0ks ee6y5p9 ee70370
ee71nxv ee72tj4 ee7d0w7 ee7e64c ee7ezvs ee7gx50 ee7hqvo ee7n40v ee7s1jk ee7szwg ee7uex1 ee83frk
ee8a1uj ee8mjqp ee8mtp0 ee8rrho ee8xyo7 ee91yqq ee93xw8 ee95nci ee9ovup ee9rsd8 ee9slnf ee9wzc6
eea16y1 eea1b87 eea24ox eea997z eeaal96 eeabf0x eeabrkx eeacg48 eeakafm eealr4f eeanq7r eeaothh
eeaqrj7 eearbor eeausvm eeb2uod eeb2y2u eeb9eiy eebbnny eebeenr eebhrde eebm0tz eebt0yo eebuhth
eebwxkr eebx7x7 eebycs1 eec7j1g eecg2ly eecglu3 eecm9y1 eecrq51 eecsc0x eectrzo eecu1b6 eed7qb0
eed882x eed8cg1 eed9oq2 eed9yzm eedkqtk eedop51 eedtwpf eedxkvv eee2bou eee427l eeeajrh eeeg5td
eeeg69u eeerg5v eef32ss eefgzap eefiew6 eefoi23 eefr21i eefx8tg eeg64qz eeg678t eegehss eeglc1u
eeglsgh eegp95p eegpyf2 eegt26p eegxfxe eeh2g3j eeh3q1y eehsaak eehts6r eehtttu eehvsaq eei2i3w
eei49lr eeidol8 eeitygk eeiupun eeivqfb eej85k7 eejga22 eejj57x eejjai3 eejm5tn eejutcg eejyht6
eejyia8 eek5sfq eekb3dx eekby4q eekerdv eekfk83 eekm2mn eekp5gi eekpxgu eekv307 eekwn39 eel3qgk
eel4gs7 eeldnnq eelf2ij eelf3mi eeljtyr eelojiq eels7fq eeltk8w eelwwe4 eem4yea eemf4da eemhb9t
eemhiji eemucb6 eemx4xv een1j3a een27c3 een4igj een5w36 een60ih eenh9q5 eenix7i eenk3ui eenkhyw
eennz0q eenv1pb eeo2054 eeojeqe eeold3z eeomndj eeoui0y eeoulo9 eep85vg eep97vb eepb46i eepd52b
eepj6kt eeplbdh eepnpso eepo4t6 eepobi3 eeppbtl eepte77 eepwwkl eeq7qd2 eeqamx0 eeqikij eeqv094
eeqvde4 eeqzmin eer5voe eer61np eergt89 eerpxg7 eeru3rp eerudzj ees38zh ees65vo ees9ea7 eesajki
eesdd17 eesmjoo eesstwu eet2ewq eeta1qa eetlh1q eetlif1 eeu33cz eeu3o3n eeu4qki eeu92hs eeuhyfj
eeuoejg eeuudh4 eev6gpc eev8tdk eev9c1s eeva1gn eevfn1s eevh400 eevkkqw eevq4j1 eevwe7c eevxvpw
eewej91 eewk7ef eewppx3 eewrafg eewzmut eex2z2r eexdp15 eexx4c7 eey3wm1 eey42p5 eey5v8c eey7nln
eey9qv3 eeyaoze eeyhaq7 eeyp7w8 eeyssse eeytdjm eeyyq99 eez9izh eezadz8 eezdk5s eezw2fl eezzt7a
eezzv3d ef031eb ef0450f ef0z77q ef16sde ef1eq85 ef1i9q3 ef1lw6h ef1nrjy ef1pdq9 ef1ptcb ef1r7bj
ef1wajp ef22wm8 ef2c8wp ef2d4r4 ef2n7oz ef3cuhh ef3gvik ef3ip3n ef3nupt ef3os3b ef3r8uo ef48ooz
ef4beb7 ef4djgp ef4hqt0 ef4litv ef4m4kv ef55sqj ef56cjf ef5fb12 ef5htv6 ef5qexv ef5ti2f ef5urrx
ef629xy ef6kojt ef6q4f1 ef6tx1q ef70jgb ef70zlt ef71pfk ef727wy ef72ayu ef72tjs ef77erd ef7dy85
ef7jlf9 ef7rklz ef7vttg ef7vxhx ef7wv6d ef82snz ef82zgl ef86g11 ef8ijup ef8wmy7 ef8yp5h ef92h73
ef96gt6 ef9ehgv ef9jsun ef9p0ys ef9qzcn ef9ruw0 ef9w70e ef9zjbx efafosi efaj65w efaltf3 efam1r7
efaul5g efb7e1k efbh0dp efbhws6 efbm1g4 efbnehf efbq3z9 efc3kii efcdgsl efcigxz efd6e9g efdbsu3
efddtyh efdkt10 efdo8nb efe0fbe efe3xec efe75h7 efefkv4 efefln5 efegh7z efenssd efeoeou efet0j4
efetssk efevefn efevjno efezx7j eff1eao eff6flv effba5v effia0u effntwc efg0w0j efg2p31 efg88ln
efg90h9 efgkvc3 efgv5zy efgz3es efh0c26 efh1if9 efh9m3l efhc3d9
""".split())
DROP_ZH = frozenset("""
16 44 60 61 68 92 97 128 129 137 142 172 192 193 198 249 314 336 341 342 350 374 416 430 437 444
445 453 468 478 505 519 520 553 556 558 559 566 585 622 652 660 672 692 717 724 726 762 763 791
799 801 816 826 843 862 926 943 945 949 975 976 996 1000 1008 1013 1014 1030 1035 1056 1066 1079
1087 1106 1127 1139 1140 1169 1199 1245 1284 1316 1318 1341 1365 1371 1398 1424 1434 1464 1498
1507 1546 1563 1566 1575 1580 1584 1595 1606 1607 1642 1670 1718 1731 1755 1756 1759 1764 1799
1826 1840 1895 1916 1928 2015 2018 2027 2035 2086 2112 2149 2150 2165 2210 2231 2250 2268 2274
2292 2320 2322 2346 2359 2386 2410 2416 2422 2460 2463 2475 2483 2492 2496 2517 2531 2577 2621
2640 2683 2729 2732 2735 2744 2745 2783 2785 2796 2816 2818 2822 2848 2857 2885 2895 2896 2945
2956 2961 2973 2994 3001 3004 3024 3052 3104 3144 3146 3148 3163 3180 3184 3199 3201 3207 3212
3226 3232 3239 3256 3268 3314 3335 3338 3341 3367 3392 3407 3411 3414 3466 3468 3474 3519 3524
3534 3558 3560 3574 3585 3656 3665 3674 3681 3686 3697 3709 3760 3764 3770 3784 3788 3795 3796
3813 3815 3819 3829 3856 3861 3864 3874 3907 3946 3954 3977 4007 4020 4023 4026 4037 4055 4067
4077 4088 4090 4112 4119 4122 4124 4135 4137 4139 4150 4166 4170 4173 4176 4225 4234 4267 4270
4277 4320 4362 4399 4409 4420 4476 4494 4511 4523 4527 4529 4541 4589 4594 4598 4643 4683 4705
4711 4713 4729 4743 4750 4793 4794 4799 4804 4821 4847 4850 4863 4872 4874 4880 4907 4909 4915
4965 4994
""".split())


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\t", " ").replace("\r", " ").replace("\n", " ")).strip()


def goemotions_pools(paths: list[Path]) -> dict[str, list[tuple[str, str]]]:
    pools: dict[str, list[tuple[str, str]]] = {label: [] for label in LABELS}
    rows = []
    for path in paths:
        with path.open(encoding="utf-8", newline="") as f:
            rows += list(csv.reader(f, delimiter="\t"))
    for text, ids, comment_id in rows:
        ids = ids.split(",")
        if len(ids) != 1:
            continue
        label = GOEMOTIONS_MAP.get(GOEMOTIONS_NAMES[int(ids[0])])
        text = clean(text)
        # masked names/religions read unnaturally; very short comments carry no emotion alone
        if label is None or "[" in text or len(text.split()) < 4 or len(text) > 300:
            continue
        pools[label].append((comment_id, text))
    return pools


def smp_pools(path: Path) -> dict[str, list[tuple[str, str]]]:
    pools: dict[str, list[tuple[str, str]]] = {label: [] for label in LABELS}
    for row in json.loads(path.read_text(encoding="utf-8")):
        text = clean(row["content"])
        # retweet chains and mentions make the author's own emotion unclear; keep texts short
        if "@" in text or not 6 <= len(text) <= 150:
            continue
        pools[SMP_MAP[row["label"]]].append((str(row["id"]), text))
    return pools


def sample(tiers: list[dict[str, list[tuple[str, str]]]], drop: frozenset[str], n: int) -> list[tuple[str, str, str]]:
    """Per label: each tier's rows in a fixed-seed order, tier after tier; the first n not dropped."""
    rows, seen = [], set()
    rngs = [random.Random(SEED + 100 * tier_no) for tier_no in range(len(tiers))]
    for label in LABELS:
        pool = []
        for rng, pools in zip(rngs, tiers):
            part = sorted(pools[label])
            rng.shuffle(part)
            pool += part
        kept = 0
        for row_id, text in pool:
            if kept == n:
                break
            if row_id in drop or text in seen:
                continue
            seen.add(text)
            rows.append((row_id, text, label))
            kept += 1
    return rows


def write(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.write("text\tlabel\n")
        for _, text, label in rows:
            f.write(f"{text}\t{label}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--goemotions", type=Path, nargs="+", required=True)
    ap.add_argument("--goemotions-extra", type=Path, nargs="*", default=[])
    ap.add_argument("--smp", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--n", type=int, default=N_PER_LABEL)
    ap.add_argument("--list", action="store_true", help="print id, label, text of the sample instead of writing")
    args = ap.parse_args()
    en_tiers = [goemotions_pools(args.goemotions)]
    if args.goemotions_extra:
        en_tiers.append(goemotions_pools(args.goemotions_extra))
    for name, tiers, drop in (("en", en_tiers, DROP_EN), ("zh", [smp_pools(args.smp)], DROP_ZH)):
        rows = sample(tiers, drop, args.n)
        if args.list:
            for row_id, text, label in rows:  # per label, in the order the rows were read
                print(f"{name}\t{label}\t{row_id}\t{text}")
        else:
            random.Random(SEED + 1).shuffle(rows)
            write(args.out / f"{name}.tsv", rows)


if __name__ == "__main__":
    main()
